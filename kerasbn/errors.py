"""Exceptions that kerasbn raises for input it cannot handle.

Every error a user can cause (a bad file, an unsupported model) is a
`KerasbnError` with a one-line message that says what is wrong and what to do;
the command line prints it without a traceback and exits with status 2.
"""


class KerasbnError(Exception):
    """Base class: a problem with the user's input, not a bug in kerasbn."""


class ModelLoadError(KerasbnError):
    """A model file is missing, unreadable, corrupted or refused in safe mode."""


class UnsupportedModelError(KerasbnError):
    """The model has no functional graph, or uses a construct kerasbn cannot rewrite."""


class VerificationError(KerasbnError):
    """A rewritten or exported model does not reproduce the original's outputs."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The line of ``exc``'s message that says what is wrong, at most ``limit`` characters.

    Messages of other libraries run to many lines (tracebacks, graph dumps); a
    kerasbn error quotes one. An empty message gives the exception's type name.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Graph execution error"):
        # TensorFlow: the op's own message follows the Python traceback, before the node name.
        told = [ln for ln in lines if not ln.startswith(("[[", "File ", "Detected at node", "Graph execution"))]
        lines = told[-1:] or lines
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
