"""Import TensorFlow without its start-up noise, keeping every real error.

The command line's choice, not the library's: `kerasbn` itself never
touches the process's stderr. TensorFlow 2.21 writes an absl preamble, a oneDNN notice and CUDA probe
messages straight to file descriptor 2 at import, even with
``TF_CPP_MIN_LOG_LEVEL=3``. They are caught at the descriptor level while
TensorFlow and Keras load; lines that are not known start-up noise are written
back to stderr, and a failed import shows everything it printed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

_NOISE = re.compile(
    r"All log messages before absl::InitializeLog"
    r"|oneDNN custom operations are on"
    r"|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc|cuInit"
    r"|Could not find cuda drivers"
    r"|rebuild TensorFlow with the appropriate compiler flags"
    r"|This TensorFlow binary is optimized"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|TF-TRT Warning"
    # The LiteRT interpreter and converter, on every run or conversion:
    r"|Created TensorFlow Lite XNNPACK delegate"
    r"|fully_quantize: \d+, inference_type"
)
# Python warnings TensorFlow's LiteRT converter raises from its own internals on every int8 conversion.
_CONVERTER_WARNINGS = (
    r"\s*Warning: tf\.lite\.Interpreter is deprecated",
    r"Statistics for quantized inputs were expected",
)


@contextlib.contextmanager
def quiet_stderr(*, keep_python: bool = False, on_failure: str = "all") -> Iterator[None]:
    """Hold back known TensorFlow start-up noise written to fd 2.

    With `keep_python`, Python's own ``sys.stderr`` (the progress spinner,
    warnings) keeps writing to the real stderr meanwhile; only what native
    code writes to fd 2 is held back and filtered. When the body raises,
    `on_failure` says what is shown: ``"all"`` that was held back, noise
    included, or ``"none"`` (the caller reports the failure itself).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        if keep_python:
            sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding, closefd=True)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if keep_python:
                sys.stderr.close()
                sys.stderr = python_stderr
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            if failed and on_failure == "none":
                kept = []
            else:
                kept = [ln for ln in text.splitlines() if failed or not _NOISE.search(ln)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


def import_frameworks(*extra: str) -> None:
    """Import Keras (and TensorFlow when it is installed) quietly, then the ``extra`` modules.

    Each module prints its noise once, on first import or device probe; after
    this, the library's own imports of them are silent.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_stderr():
        import keras  # noqa: F401

        try:
            import tensorflow as tf
        except ImportError:  # a JAX-only installation: nothing to hold back
            pass
        else:
            tf.config.list_physical_devices()
        for name in extra:
            importlib.import_module(name)


@contextlib.contextmanager
def converter_noise(verbose: bool = False) -> Iterator[None]:
    """Hold back what the LiteRT converter and interpreter print on every run (fd 2 and Python warnings).

    When the conversion fails, the command's one-line error carries the
    converter's diagnosis, so its multi-line dump to fd 2 is shown only when `verbose`.
    """
    import warnings

    with warnings.catch_warnings(), quiet_stderr(keep_python=True, on_failure="all" if verbose else "none"):
        for message in _CONVERTER_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield
