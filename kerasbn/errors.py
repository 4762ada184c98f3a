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
