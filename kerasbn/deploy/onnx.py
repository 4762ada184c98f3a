"""Export a Keras model to ONNX, folded first and checked with ONNX Runtime.

The conversion goes through `tf2onnx.convert.from_function` on a
`tf.function` whose input signature has a dynamic batch dimension, the path
Keras's own ``model.export(format="onnx")`` takes; ``from_keras`` is
unreliable on Keras 3. The written file is then run by ONNX Runtime at two
batch sizes and compared with the original Keras model by
`kerasbn.deploy.verify.compare`, so a bad fold or a bad conversion never
reaches the output path.

TensorFlow, tf2onnx and ONNX Runtime are imported inside the functions: they
cost seconds, and importing this module should not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kerasbn.deploy.files import atomic_output
from kerasbn.deploy.tolerances import ATOL, RTOL
from kerasbn.errors import KerasbnError, UnsupportedModelError, VerificationError
from kerasbn.report import export_table, op_table

if TYPE_CHECKING:  # the module itself stays cheap to import
    from kerasbn.deploy.verify import VerifyResult


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote and how it checked it.

    Attributes:
        path: the ONNX file (written only when every check passed).
        opset: the ONNX opset of the graph.
        op_counts: op type → count in the written graph.
        op_counts_unfolded: the same for the model converted without folding
            (None with ``fold=False``): the "before" column of the table.
        fold_report: the fold engine's report, or None with ``fold=False``.
        checks: one `VerifyResult` per batch size (empty with ``verify=False``).
        size: bytes of the written file.
        size_unfolded: bytes of the unfolded model's ONNX (None with ``fold=False``).
    """

    path: Path
    opset: int
    op_counts: dict[str, int]
    op_counts_unfolded: dict[str, int] | None = None
    fold_report: Any = None
    checks: tuple[VerifyResult, ...] = field(default_factory=tuple)
    size: int = 0
    size_unfolded: int | None = None

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def op_table(self) -> list[tuple[str, int | None, int]]:
        """Rows (op type, count before fold or None, count after), onnx-simplifier style."""
        return op_table(self.op_counts, self.op_counts_unfolded)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``kerasbn export --format json``)."""
        return {
            "path": str(self.path),
            "opset": self.opset,
            "op_counts": dict(self.op_counts),
            "op_counts_unfolded": None if self.op_counts_unfolded is None else dict(self.op_counts_unfolded),
            "fold": None if self.fold_report is None else self.fold_report.to_dict(),
            "verified": self.verified,
            "checks": [c.to_dict() for c in self.checks],
            "size": self.size,
            "size_unfolded": self.size_unfolded,
        }

    def __rich__(self) -> Any:
        return export_table(
            f"ONNX graph of {self.path.name} (opset {self.opset})",
            self.op_counts,
            self.op_counts_unfolded,
            self.size,
            self.size_unfolded,
        )


class ExportVerificationError(VerificationError):
    """ONNX Runtime disagrees with Keras; `result` holds the numbers (nothing was written)."""

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    fold: bool = True,
    verify: bool = True,
    overwrite: bool = False,
    batch_sizes: Sequence[int] = (1, 8),
    inputs: Any = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Fold BatchNormalization away, convert to ONNX and check it with ONNX Runtime.

    Args:
        model: a functional or Sequential `keras.Model` (TensorFlow backend).
        path: the `.onnx` file to write (atomically).
        opset: ONNX opset; tf2onnx's default when None.
        fold: run `kerasbn.fold` first so no BatchNormalization, and no
            per-channel Mul/Add left over from one, reaches the graph.
        verify: compare ONNX Runtime with the original Keras model at every
            batch size in `batch_sizes` before the file is put in place.
        overwrite: replace an existing `path`.
        batch_sizes: batch sizes of the random verification inputs; two
            different ones show the batch dimension is really dynamic.
        inputs: verification inputs in the structure the model takes (as
            `kerasbn.deploy.files.load_inputs` returns them) instead of random ones;
            checked whole and as their first row.
        atol, rtol: elementwise tolerance ``|onnx − keras| ≤ atol + rtol·|keras|``.
        seed: seed of the random inputs.
        on_step: called with a short description before each long step.

    Returns:
        An `ExportResult`.

    Raises:
        ExportVerificationError: ONNX Runtime disagrees with Keras; no file is written.
        UnsupportedModelError: the model cannot be traced or converted.
        KerasbnError: the output path is not writable or exists.
    """
    _require_tensorflow_backend()
    step = on_step or (lambda _message: None)
    path = Path(path)
    if verify and not batch_sizes and inputs is None:
        raise KerasbnError("export_onnx: verification needs at least one batch size")
    fold_report = None
    before = size_before = None
    target = model
    if fold:
        from kerasbn.folding.fold import fold as fold_model

        step("Folding BatchNormalization")
        folded = fold_model(model)
        target, fold_report = folded.model, folded.report
        step("Converting the unfolded model (for the op table)")
        unfolded = to_onnx(model, opset=opset)
        before, size_before = op_counts(unfolded), unfolded.ByteSize()
    step("Converting to ONNX")
    proto = to_onnx(target, opset=opset)
    after = op_counts(proto)
    opset_used = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        checks: tuple[VerifyResult, ...] = ()
        if verify:
            step("Checking with ONNX Runtime")
            checks = _check_with_onnxruntime(tmp, model, batch_sizes, inputs, atol, rtol, seed)
        result = ExportResult(path, opset_used, after, before, fold_report, checks, proto.ByteSize(), size_before)
        failed = [c for c in checks if not c.passed]
        if failed:
            worst = max(failed, key=lambda c: c.max_abs_error)
            raise ExportVerificationError(
                f"ONNX Runtime disagrees with Keras at batch size {worst.batch_size}: max |error| "
                f"{worst.max_abs_error:.3g} exceeds {worst.tolerance}; nothing written",
                result,
            )
    return result


def to_onnx(model: Any, *, opset: int | None = None) -> Any:
    """Convert `model` to an `onnx.ModelProto` with a dynamic batch dimension.

    Inputs keep the model's input names; outputs are the model's outputs in
    `keras.tree.flatten` order.
    """
    import keras
    import tensorflow as tf

    _require_tensorflow_backend()
    try:
        tensors = list(model.inputs)
    except (AttributeError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot export {type(model).__name__}: the model has no input signature") from exc
    specs = [tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=_onnx_name(t.name, i)) for i, t in enumerate(tensors)]
    structure = model.input

    def forward(*args):
        outputs = model(keras.tree.pack_sequence_as(structure, list(args)), training=False)
        return tuple(keras.tree.flatten(outputs))

    function = tf.function(forward, input_signature=specs, autograph=False)
    with _tf2onnx() as tf2onnx:
        try:
            proto, _ = tf2onnx.convert.from_function(function, input_signature=specs, opset=opset)
        except Exception as exc:  # tf2onnx raises bare Exceptions for unsupported ops
            raise UnsupportedModelError(f"tf2onnx cannot convert the model: {_first_line(exc)}") from exc
    return proto


def _require_tensorflow_backend() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise UnsupportedModelError(
            f"ONNX export goes through tf2onnx and needs the TensorFlow backend, not {keras.backend.backend()}; "
            "run with KERAS_BACKEND=tensorflow"
        )


def op_counts(proto: Any) -> dict[str, int]:
    """Op type → number of nodes, subgraphs (If, Loop, Scan bodies) included."""
    counts: Counter[str] = Counter()

    def visit(graph: Any) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(proto.graph)
    return dict(sorted(counts.items()))


def _check_with_onnxruntime(
    file: Path, model: Any, batch_sizes: Sequence[int], inputs: Any, atol: float, rtol: float, seed: int
) -> tuple[VerifyResult, ...]:
    import keras
    import onnxruntime as ort

    from kerasbn.deploy.verify import compare, keras_outputs, random_inputs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if inputs is not None:
        arrays = keras.tree.flatten(inputs)
        cases = [arrays, [a[:1] for a in arrays]]
    else:
        cases = [keras.tree.flatten(random_inputs(model, b, seed + k)) for k, b in enumerate(batch_sizes)]
    checks = []
    for arrays in cases:
        expected = keras_outputs(model, keras.tree.pack_sequence_as(model.input, arrays))
        got = session.run(None, {n: a for n, a in zip(names, arrays)})
        checks.append(compare(expected, got, batch_size=int(arrays[0].shape[0]), atol=atol, rtol=rtol))
    return tuple(checks)


@contextlib.contextmanager
def _tf2onnx() -> Iterator[Any]:
    """tf2onnx, patched for NumPy 2 the way Keras does it, its INFO/WARNING logging held back meanwhile."""
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    logger = logging.getLogger("tf2onnx")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            import tf2onnx

            patch_tf2onnx()
            yield tf2onnx
        finally:
            logger.setLevel(level)


def _onnx_name(name: str, index: int) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name or "")
    return cleaned or f"input_{index}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."
