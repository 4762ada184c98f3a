"""The LiteRT (TFLite) target: TensorFlow's converter, builtin ops only, the LiteRT interpreter.

The model's inference call is traced as a `tf.function` with a dynamic batch
dimension and written, with the model's variables, as a temporary SavedModel
(Keras's `ExportArchive`, the path ``model.export(format="litert")`` takes);
TensorFlow's LiteRT converter freezes it into a flatbuffer with one signature
(inputs named as `kerasbn.model_signature.Signature` names them, outputs
``output_0``, ``output_1``, ...). Only LiteRT builtin ops are allowed: a model
that needs TensorFlow ("flex") ops would not run on a phone or
microcontroller without the flex delegate, so the converter's refusal is
reported instead. int8 is the converter's full-integer quantization with the
calibration rows as representative dataset.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kerasbn.deploy.runtime import Runner
from kerasbn.deploy.target import Target, require_tensorflow
from kerasbn.errors import UnsupportedModelError, first_line

if TYPE_CHECKING:  # the module itself stays cheap to import
    import numpy as np


class LiteRTTarget(Target):
    """LiteRT flatbuffers, run by the LiteRT interpreter."""

    name = "litert"
    title = "LiteRT"
    runtime = "LiteRT"
    suffix = ".tflite"

    def convert(self, model: Any, sig: Any, *, dtype: str = "float32") -> bytes:
        return to_litert(model, sig, float16=dtype == "float16")

    def check_backend(self) -> None:
        require_tensorflow("LiteRT export goes through TensorFlow's converter")

    def serialize(self, graph: bytes) -> bytes:
        return graph

    def load(self, content: bytes) -> bytes:
        return content

    def runner(self, source: Path | bytes, sig: Any) -> Runner:
        from kerasbn.deploy.runtime import litert_runner

        return litert_runner(source, sig.names)

    def probed(self, content: bytes, tensors: Sequence[Any]) -> bytes:
        return probed(content, tensors)

    def op_counts(self, graph: bytes) -> dict[str, int]:
        return op_counts(graph)

    def version(self, graph: bytes) -> int:
        return schema_version(graph)

    def describe(self, filename: str, version: int) -> str:
        return f"LiteRT graph of {filename} (schema v{version})"

    def quantize(self, model: Any, sig: Any, float_path: Path, rows: Sequence[np.ndarray]) -> bytes:
        # One representative sample per row, a batch of one each (the converter's calibrator feeds them so).
        samples = [[a[i : i + 1] for a in rows] for i in range(rows[0].shape[0])]
        return to_litert(model, sig, representative=samples)


TARGET = LiteRTTarget()


# The one signature of the file (its name is not part of what runners look up).
SIGNATURE = "serving_default"


def to_litert(
    model: Any,
    sig: Any = None,
    *,
    float16: bool = False,
    representative: Iterable[Sequence[np.ndarray]] | None = None,
    learned_ranges: bool = False,
) -> bytes:
    """Convert `model` to a LiteRT flatbuffer with a dynamic batch dimension.

    Args:
        model: the Keras model (TensorFlow backend).
        sig: its `kerasbn.model_signature.Signature` (the model's own when None): the
            signature's input names.
        float16: store the weights in float16 (the converter's float16
            quantization: half the size; GPU delegates compute in float16, the
            CPU dequantizes to float32 once); inputs and outputs stay float32.
        representative: for full-integer (int8) quantization, an iterable of
            calibration samples, each a list of arrays in the model's flattened
            input order with a batch of one. Weights and activations become
            int8 (only int8 builtin ops are allowed); the inputs and outputs
            stay float32, so the file is a drop-in for the float one.
        learned_ranges: the model carries its own quantization (the FakeQuant
            ops of a quantization-aware model, `kerasbn.deploy.qat_int8`): the
            converter's ``Optimize.DEFAULT`` with no representative data reads
            every scale from them (int8 kernels, float32 inputs and outputs).
            From a concrete function instead of a SavedModel it would refuse
            ``FakeQuantWithMinMaxVarsPerChannel`` as a non-builtin op, and
            without ``Optimize.DEFAULT`` it leaves the kernels float between
            QUANTIZE/DEQUANTIZE pairs.

    Raises:
        UnsupportedModelError: the model cannot be traced or the converter rejects it.
    """
    import tempfile

    import keras
    import numpy as np
    import tensorflow as tf

    from kerasbn.model_signature import signature

    require_tensorflow("LiteRT export goes through TensorFlow's converter")
    sig = sig or signature(model)
    specs = sig.tf_specs()
    forward = sig.forward(model)

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
            raise UnsupportedModelError(f"cannot trace the model for LiteRT: {first_line(exc)}") from exc
        converter = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=[SIGNATURE])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if float16 or learned_ranges:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if float16:
            converter.target_spec.supported_types = [tf.float16]
        if representative is not None:
            samples = list(representative)

            def dataset() -> Iterator[dict[str, np.ndarray]]:
                for sample in samples:
                    yield {spec.name: np.asarray(a, spec.dtype) for spec, a in zip(sig.inputs, sample)}

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            return bytes(converter.convert())
        except Exception as exc:  # ConverterError, RuntimeError from the calibrator, ...
            raise UnsupportedModelError(f"the LiteRT converter rejects the model: {converter_message(exc)}") from exc


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


def probed(content: bytes, tensors: Sequence[tuple[int, int]]) -> bytes:
    """The flatbuffer with these (subgraph 0, index) tensors as outputs ``output_N``, ``output_N+1``, ... of
    its signature and of its subgraph (a delegate keeps a subgraph output in memory, not only in its own)."""
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    graph, signature = model.subgraphs[0], model.signatureDefs[0]
    indices = [index for subgraph, index in tensors if subgraph == 0]
    graph.outputs = [*graph.outputs, *indices]
    first = len(signature.outputs)
    for k, index in enumerate(indices):
        output = schema.TensorMapT()
        output.name, output.tensorIndex = f"output_{first + k}", index
        signature.outputs.append(output)
    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def schema_version(content: bytes) -> int:
    """The LiteRT schema version the flatbuffer declares."""
    return int(_schema().Model.GetRootAsModel(content, 0).Version())


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # TensorFlow ships the same generated schema
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


# The diagnosis after "error:", without the MLIR location a SavedModel's ops carry ("loc(callsite(...)): ").
_CONVERTER_ERROR = re.compile(r"error: (?:loc\(.*\): )?(.+)")


def converter_message(exc: BaseException) -> str:
    """The converter's own diagnosis (its first ``error:`` line), else the first line of `exc`."""
    for line in str(exc).splitlines():
        match = _CONVERTER_ERROR.search(line)
        if match:
            return _shorten(match.group(1).strip())
    return first_line(exc)


def _shorten(line: str) -> str:
    return line if len(line) <= 160 else line[:157] + "..."
