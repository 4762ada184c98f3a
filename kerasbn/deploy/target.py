"""Export targets: what the pipeline asks of a file format, and the registry of formats.

`kerasbn.deploy.export` runs one sequence for every format (signature →
fold → convert → graph passes → int8 → run in the target's runtime → compare
→ atomic write); a `Target` supplies the format's own steps. A new format is
one module defining a `Target` subclass instance named ``TARGET``, plus its
module name in `REGISTRY`.

Target modules import their converters (tf2onnx, TensorFlow's LiteRT
converter) inside the methods, so the registry is cheap to read.
"""

from __future__ import annotations

import abc
import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kerasbn.deploy.runtime import Runner
from kerasbn.errors import KerasbnError, UnsupportedModelError, VerificationError, first_line

# One line per format: the module that defines its ``TARGET``.
REGISTRY = (
    "kerasbn.deploy.onnx",
    "kerasbn.deploy.litert",
)


class Target(abc.ABC):
    """A file format the pipeline writes (subclass it; each method has one job).

    ``graph`` below is the format's in-memory model (an ``onnx.ModelProto``,
    LiteRT flatbuffer bytes...), as `convert` makes it.

    Attributes:
        name: The format's name (``kerasbn export --to NAME``, ``kerasbn.export(to=NAME)``).
        title: The format as printed (``"ONNX"``).
        runtime: The runtime that runs the files (``"ONNX Runtime"``).
        suffix: The file suffix that selects the format.
        options: The format's own `kerasbn.export` keyword arguments (``opset``).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    runtime: ClassVar[str]
    suffix: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def convert(self, model: Any, sig: Any, **options: Any) -> Any:
        """``model`` → graph, its inputs as the `kerasbn.model_signature.Signature` ``sig`` names them, batch dynamic."""

    @abc.abstractmethod
    def check_backend(self) -> None:
        """Raise `UnsupportedModelError` if the format cannot be written on this Keras backend."""

    def passes(self) -> Sequence[tuple[str, Callable[[Any], Any]]]:
        """The format's graph passes in order, (name, graph → graph); none by default."""
        return ()

    @abc.abstractmethod
    def serialize(self, graph: Any) -> bytes:
        """The bytes of the file."""

    @abc.abstractmethod
    def load(self, content: bytes) -> Any:
        """The graph of a file's bytes (`serialize`'s inverse)."""

    @abc.abstractmethod
    def runner(self, source: Path | bytes, sig: Any) -> Runner:
        """A function running a file (a path, or its bytes) in the target's runtime: flat arrays in Keras order."""

    @abc.abstractmethod
    def probed(self, content: bytes, tensors: Sequence[Any]) -> bytes:
        """The file with these of its tensors (`kerasbn.deploy.int8_file.IntegerActivation.tensor`) as extra
        outputs after the model's: what `runner` then returns for them, the kernels that make them unchanged."""

    @abc.abstractmethod
    def op_counts(self, graph: Any) -> dict[str, int]:
        """Op type → count in the graph."""

    @abc.abstractmethod
    def version(self, graph: Any) -> int:
        """The format version the graph declares (ONNX opset, LiteRT schema)."""

    def describe(self, filename: str, version: int) -> str:
        """The heading of the op table."""
        return f"{self.title} graph of {filename} (version {version})"

    def guarded(self, body: Callable[[], Any]) -> Any:
        """``body()``, with the runtime's failure to load or run a file as one `UnsupportedModelError` line.

        ONNX Runtime and the LiteRT interpreter raise their own exception types
        for a graph they cannot load (a type without a kernel, an unknown op) or
        run; either means the model does not deploy to this target as converted.
        """
        try:
            return body()
        except (KerasbnError, VerificationError):
            raise
        except Exception as exc:  # the runtimes' own errors (InvalidGraph, RuntimeError, ValueError...)
            raise UnsupportedModelError(
                f"{self.runtime} cannot run the converted {self.title} file: {first_line(exc)}; nothing written"
            ) from exc

    @abc.abstractmethod
    def quantize(self, model: Any, sig: Any, float_path: Path, rows: Sequence[np.ndarray]) -> Any:
        """The static int8 graph of ``model``, calibrated on ``rows`` (flat arrays in input order).

        ``float_path`` is the verified float file of the same (folded) model.
        """


def targets() -> dict[str, Target]:
    """Every registered target by name."""
    found = {}
    for module in REGISTRY:
        target = importlib.import_module(module).TARGET
        found[target.name] = target
    return found


def target_for(path: str | os.PathLike, to: str | None = None) -> Target:
    """The target named ``to`` (it must agree with a known suffix of ``path``), else the one of the suffix.

    Raises:
        KerasbnError: an unknown format, a suffix of another format, or no known suffix.
    """
    known = targets()
    by_suffix: dict[str, Target] = {}
    for target in known.values():  # the first registered format of a suffix is its default
        by_suffix.setdefault(target.suffix, target)
    suffix = Path(path).suffix.lower()
    implied = by_suffix.get(suffix)
    if to is not None:
        if to not in known:
            raise KerasbnError(f"unknown export format '{to}'; use {', '.join(known)}")
        if implied is not None and implied.name != to:
            raise KerasbnError(f"{path}: a '{suffix}' file is not {to}; use the {known[to].suffix} suffix")
        return known[to]
    if implied is None:
        suffixes = " or ".join(by_suffix)
        raise KerasbnError(f"{path}: cannot tell the format from '{suffix or 'no suffix'}'; use {suffixes}")
    return implied


def require_tensorflow(what: str) -> None:
    """Raise `UnsupportedModelError` unless Keras runs on TensorFlow (``what``: why the target needs it)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise UnsupportedModelError(
            f"{what} and needs the TensorFlow backend, not {keras.backend.backend()}; run with KERAS_BACKEND=tensorflow"
        )
