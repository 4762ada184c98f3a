"""Export a Keras model to LiteRT (TFLite), folded first and checked in the LiteRT interpreter.

The model's inference call is traced as a `tf.function` with a dynamic batch
dimension and written, with the model's variables, as a temporary SavedModel
(Keras's `ExportArchive`, the path ``model.export(format="litert")`` takes);
TensorFlow's LiteRT converter freezes it into a flatbuffer with one signature
(inputs named after the model's, outputs ``output_0``, ``output_1``, ...).
Only LiteRT builtin ops are allowed: a model that needs TensorFlow ("flex")
ops would not run on a phone or microcontroller without the flex delegate,
so the converter's refusal is reported instead.

The written file is run by the LiteRT interpreter at two batch sizes and
judged against Keras by `kerasbn.deploy.verify.compare`, exactly like the
ONNX export; nothing reaches the output path unless it passes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kerasbn.deploy.files import atomic_output
from kerasbn.deploy.onnx import ExportResult, ExportVerificationError
from kerasbn.errors import KerasbnError, UnsupportedModelError
from kerasbn.report import export_table

if TYPE_CHECKING:  # the module itself stays cheap to import
    import numpy as np

    from kerasbn.deploy.verify import VerifyResult


@dataclass(frozen=True)
class LiteRTExportResult(ExportResult):
    """What `export_litert` wrote and how it checked it.

    The fields are `kerasbn.deploy.onnx.ExportResult`'s; ``opset`` holds the
    LiteRT schema version and the op counts are by builtin operator name.
    """

    runtime: ClassVar[str] = "LiteRT"

    def to_dict(self) -> dict[str, Any]:
        return {"format": "litert", **super().to_dict()}

    def __rich__(self) -> Any:
        return export_table(
            f"LiteRT graph of {self.path.name} (schema v{self.opset})",
            self.op_counts,
            self.op_counts_unfolded,
            self.size,
            self.size_unfolded,
        )


# The one signature of the file (its name is not part of what runners look up).
SIGNATURE = "serving_default"


def export_litert(
    model: Any,
    path: str | os.PathLike,
    *,
    fold: bool = True,
    verify: bool = True,
    overwrite: bool = False,
    batch_sizes: Sequence[int] = (1, 8),
    inputs: Any = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> LiteRTExportResult:
    """Fold BatchNormalization away, convert to LiteRT and check it in the LiteRT interpreter.

    Args:
        model: a functional or Sequential `keras.Model` (TensorFlow backend).
        path: the `.tflite` file to write (atomically).
        fold: run `kerasbn.fold` first so no BatchNormalization, and no
            per-channel MUL/ADD left over from one, reaches the graph.
        verify: compare the LiteRT interpreter with the original Keras model
            at every batch size in `batch_sizes` before the file is put in place.
        overwrite: replace an existing `path`.
        batch_sizes: batch sizes of the random verification inputs; two
            different ones show the batch dimension is really dynamic.
        inputs: verification inputs in the structure the model takes (as
            `kerasbn.deploy.files.load_inputs` returns them) instead of random
            ones; checked whole and as their first row.
        atol, rtol: give either for the element-wise check ``|litert − keras| ≤ atol + rtol·|keras|``;
            by default the check is scale-aware and calibrated to the model's own float32 noise.
        seed: seed of the random inputs.
        on_step: called with a short description before each long step.

    Returns:
        A `LiteRTExportResult`.

    Raises:
        ExportVerificationError: LiteRT disagrees with Keras; no file is written.
        UnsupportedModelError: the model cannot be traced, or the converter rejects it.
        KerasbnError: the output path is not writable or exists.
    """
    step = on_step or (lambda _message: None)
    path = Path(path)
    if verify and not batch_sizes and inputs is None:
        raise KerasbnError("export_litert: verification needs at least one batch size")
    fold_report = None
    before = size_before = None
    target = model
    if fold:
        from kerasbn.folding.fold import fold as fold_model

        step("Folding BatchNormalization")
        folded = fold_model(model)
        target, fold_report = folded.model, folded.report
        step("Converting the unfolded model (for the op table)")
        unfolded = to_litert(model)
        before, size_before = op_counts(unfolded), len(unfolded)
    step("Converting to LiteRT")
    content = to_litert(target)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(content)
        checks: tuple[VerifyResult, ...] = ()
        if verify:
            step("Checking in the LiteRT interpreter")
            checks = check_file(tmp, model, batch_sizes, inputs, atol, rtol, seed)
        result = LiteRTExportResult(
            path, schema_version(content), op_counts(content), before, fold_report, checks, len(content), size_before
        )
        failed = [c for c in checks if not c.passed]
        if failed:
            worst = max(failed, key=lambda c: c.max_abs_error)
            raise ExportVerificationError(
                f"the LiteRT interpreter disagrees with Keras at batch size {worst.batch_size}: max |error| "
                f"{worst.max_abs_error:.3g} exceeds {worst.tolerance}; nothing written",
                result,
            )
    return result


def to_litert(model: Any, *, representative: Iterable[Sequence[np.ndarray]] | None = None) -> bytes:
    """Convert `model` to a LiteRT flatbuffer with a dynamic batch dimension.

    Args:
        model: the Keras model (TensorFlow backend).
        representative: for full-integer (int8) quantization, an iterable of
            calibration samples, each a list of arrays in the model's flattened
            input order with a batch of one. Weights and activations become
            int8 (only int8 builtin ops are allowed); the inputs and outputs
            stay float32, so the file is a drop-in for the float one.

    Raises:
        UnsupportedModelError: the model cannot be traced or the converter rejects it.
    """
    import tempfile

    import keras
    import numpy as np
    import tensorflow as tf

    _require_tensorflow_backend()
    try:
        tensors = list(model.inputs)
    except (AttributeError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot export {type(model).__name__}: the model has no input signature") from exc
    names = input_names(model)
    specs = [tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=n) for t, n in zip(tensors, names)]
    structure = model.input

    def forward(*args):
        outputs = model(keras.tree.pack_sequence_as(structure, list(args)), training=False)
        return tuple(keras.tree.flatten(outputs))

    # Through a SavedModel, as Keras's own export goes: the converter then reads
    # the variables from the checkpoint itself. Handing it a frozen concrete
    # function instead took 3.7 times the memory (the Python graph, its
    # serialization and the converter's import each held the weights: 2.5 GB
    # more for ResNet50) and 3 times the time.
    with tempfile.TemporaryDirectory(prefix="kerasbn-litert-") as folder:
        try:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(SIGNATURE, tf.function(forward, input_signature=specs, autograph=False))
            archive.write_out(folder, verbose=False)
            del archive
        except Exception as exc:  # tracing raises whatever the layers raise
            raise UnsupportedModelError(f"cannot trace the model for LiteRT: {_first_line(exc)}") from exc
        converter = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=[SIGNATURE])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if representative is not None:
            samples = list(representative)

            def dataset() -> Iterator[dict[str, np.ndarray]]:
                for sample in samples:
                    yield {n: np.asarray(a, t.dtype) for n, a, t in zip(names, sample, tensors)}

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            return bytes(converter.convert())
        except Exception as exc:  # ConverterError, RuntimeError from the calibrator, ...
            raise UnsupportedModelError(f"the LiteRT converter rejects the model: {converter_message(exc)}") from exc


def input_names(model: Any) -> list[str]:
    """The signature input names `to_litert` gives the model's inputs, in order."""
    return [_tensor_name(t.name, i) for i, t in enumerate(model.inputs)]


def check_file(
    file: str | os.PathLike,
    model: Any,
    batch_sizes: Sequence[int],
    inputs: Any,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> tuple[VerifyResult, ...]:
    """Run the LiteRT `file` and Keras `model` on the same inputs and judge them (`verify.check_runtime`)."""
    from kerasbn.deploy.runtime import litert_runner
    from kerasbn.deploy.verify import check_runtime

    run = litert_runner(file, input_names(model))
    return check_runtime(model, run, batch_sizes, inputs, atol=atol, rtol=rtol, seed=seed)


def op_counts(content: bytes) -> dict[str, int]:
    """Builtin operator name (custom code for custom ops) → count, over every subgraph.

    Read from the flatbuffer with LiteRT's schema, so the interpreter's
    delegates (XNNPACK replaces nodes with DELEGATE) do not change the count.
    """
    schema = _schema()
    model = schema.Model.GetRootAsModel(content, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live in BuiltinCode; DeprecatedBuiltinCode keeps the small ones.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        custom = code.CustomCode()
        codes.append(custom.decode() if builtin == schema.BuiltinOperator.CUSTOM and custom else names[builtin])
    counts: Counter[str] = Counter()
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for o in range(graph.OperatorsLength()):
            counts[codes[graph.Operators(o).OpcodeIndex()]] += 1
    return dict(sorted(counts.items()))


def schema_version(content: bytes) -> int:
    """The LiteRT schema version the flatbuffer declares."""
    return int(_schema().Model.GetRootAsModel(content, 0).Version())


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # TensorFlow ships the same generated schema
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _require_tensorflow_backend() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise UnsupportedModelError(
            f"LiteRT export goes through TensorFlow's converter and needs the TensorFlow backend, not "
            f"{keras.backend.backend()}; run with KERAS_BACKEND=tensorflow"
        )


# The diagnosis after "error:", without the MLIR location a SavedModel's ops carry ("loc(callsite(...)): ").
_CONVERTER_ERROR = re.compile(r"error: (?:loc\(.*\): )?(.+)")


def converter_message(exc: BaseException) -> str:
    """The converter's own diagnosis (its first ``error:`` line), else the first line of `exc`."""
    for line in str(exc).splitlines():
        match = _CONVERTER_ERROR.search(line)
        if match:
            return _shorten(match.group(1).strip())
    return _first_line(exc)


def _tensor_name(name: str, index: int) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name or "")
    return cleaned if cleaned and cleaned[0].isalpha() else f"input_{index}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return _shorten(text[0] if text else type(exc).__name__)


def _shorten(line: str) -> str:
    return line if len(line) <= 160 else line[:157] + "..."
