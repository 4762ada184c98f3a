"""Integer export of a quantization-aware model, from the grids and ranges it learned.

A model from `kerasbn.qat.prepare` already is its int8 model: every kernel
it multiplies with is on an integer grid (`kerasbn.qat.quantizers.weight_grid`),
every tensor the int8 graph requantizes has a learned range. `export_qat`
writes that model, not a re-quantization of it, and checks that it did.

`kerasbn.deploy` sits below `kerasbn.qat` and never imports it: a model is
recognized (`kerasbn.ops.fake_quant.is_quantization_aware`) and read by the
duck-typed protocol documented in `kerasbn.ops.fake_quant`: a layer's
``weight_grid(name)`` ``(q, scale, axis)`` (its fake-quantized kernel is
``q·scale``) and ``weight_bits``, an activation quantizer's ``bits`` and
``nudged_range()``; while a model is traced, `kerasbn.ops.fake_quant.lowering`
selects the graph operations the layers emit.

The pipeline:

    trace (the target's lowering) → convert → graph passes → check → atomic write

- LiteRT: the model traced with TensorFlow's FakeQuant ops, written as a
  SavedModel (Keras's ``ExportArchive``) and converted with
  ``optimizations=[tf.lite.Optimize.DEFAULT]`` and no representative data:
  the converter reads every scale from the FakeQuant ranges, giving int8
  CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED with per-channel scales and
  int32 biases.
- ONNX: weights traced as ``QuantizeAndDequantizeV3`` with an axis
  (``lowering("qdq")``), activations as FakeQuant, which tf2onnx turns into
  ``QuantizeLinear``/``DequantizeLinear``; then the QDQ passes of
  `kerasbn.deploy.onnx_passes` (integer weight constants, depthwise layouts
  moved into them, int32 biases), after which ONNX Runtime runs
  QLinearConv / QGemm / QLinearMatMul (`QatExportResult.runtime_op_counts`
  is ONNX Runtime's own optimized graph).

The check (`check_file`) runs before anything is written:

1. Weights: every quantized kernel's integers and scales are in the file,
   equal to its ``weight_grid()`` (the integers exactly, the scales to float32
   rounding). A converter that moves a kernel to another grid (LiteRT
   stores 3-bit weights on a 4-bit grid) fails here.
2. Ranges: every activation quantizer's nudged scale and zero point is a
   quantization parameter of the file.
3. Outputs: on the check inputs, the file's outputs against the model's own
   simulated (fake-quantized) outputs: at most `MAX_LSB` steps of the output
   quantizer per element, and the same top-1 class on every decisive row
   (`OutputCheck.decisive_top1`: a row whose top two classes lie within
   ``2·MAX_LSB`` steps may swap them within the allowed error; the top-1
   agreement over all rows is reported beside it).

Rounding: the weights reach the file as integers already (the ``qdq``
lowering hands tf2onnx the grid itself, whose quotient by the scale is an
integer up to float32 rounding), so neither ``QuantizeLinear``'s round half
to even nor TensorFlow's round half up decides one of them. Activations are
rounded at run time by the runtime's rule; where a value falls exactly
halfway (an integer pixel on a grid of 255/16 steps), ONNX Runtime and the
simulation can differ by one step there, which the output budget covers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kerasbn.errors import KerasbnError, UnsupportedModelError, VerificationError
from kerasbn.printable import Printable, Table

# Output steps (of the output's activation quantizer) a runtime may differ from
# the simulation per element: integer requantization after every layer against
# one float rounding in the simulation measured 1 step on CNNs and 2 on an
# 8-layer depthwise-separable net.
MAX_LSB = 2.0
# The outputs are float32 multiples of the step: |Δ| / step of an exact 2 steps reads 2 ± a few 1e-6.
LSB_SLACK = 1e-3
# Scales are float32 computed by different code (TensorFlow, the converter, NumPy):
# they agree to a few units of float32 rounding, and one step of a learned range
# moves a scale by 1/255 of itself.
SCALE_RTOL = 1e-5
# LiteRT keeps the grid of 4- to 8-bit weights (INT4 storage at 4 bits); a
# 3-bit or 2-bit kernel is stored on the 4-bit grid (scale max|w|/7).
LITERT_MIN_WEIGHT_BITS = 4
# Per-channel QuantizeLinear/DequantizeLinear (their axis) came with opset 13.
MIN_OPSET = 13


@dataclass(frozen=True)
class OutputCheck:
    """One input case: the file's outputs against the simulated model's.

    Attributes:
        case: What the inputs were (``"batch 8"``, ``"inputs"``, ``"inputs, first row"``).
        batch_size: Rows in the case.
        max_lsb: Max over outputs and elements of ``|Δ|`` in steps of the output's quantizer.
        top1: The fraction of rows whose top-1 class agrees, over the
            classification outputs (None without one).
        decisive_top1: The same over the decisive rows: those whose simulated
            top two classes lie more than ``2·MAX_LSB`` steps apart, the only
            ones whose class an error within `MAX_LSB` cannot swap (None
            without a classification output; 1.0 when no row is decisive).
    """

    case: str
    batch_size: int
    max_lsb: float
    top1: float | None
    decisive_top1: float | None = None

    @property
    def passed(self) -> bool:
        return self.max_lsb <= MAX_LSB + LSB_SLACK and self.decisive_top1 in (None, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "batch_size": self.batch_size,
            "max_lsb": self.max_lsb,
            "top1": self.top1,
            "decisive_top1": self.decisive_top1,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class IntegerCheck:
    """The file against the quantization-aware model (`check_file`).

    Attributes:
        weights: The quantized kernels whose grid the file holds (layer path, kernel name).
        activations: How many activation ranges the file's parameters matched.
        outputs: One `OutputCheck` per input case.
        problems: What did not match, one line each.
    """

    weights: tuple[str, ...] = ()
    activations: int = 0
    outputs: tuple[OutputCheck, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.problems and all(o.passed for o in self.outputs)

    def failure(self) -> str:
        """The first thing that failed, as one line ('' when the check passed)."""
        if self.problems:
            return self.problems[0]
        for o in self.outputs:
            if not o.passed:
                if o.max_lsb > MAX_LSB + LSB_SLACK:
                    return f"{o.case}: an output differs from the simulated model by {o.max_lsb:.3g} steps (max {MAX_LSB:g})"
                return (
                    f"{o.case}: top-1 agrees with the simulated model on {100 * o.decisive_top1:.2f} % of the "
                    "decisive rows (needs 100 %)"
                )
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": list(self.weights),
            "activations": self.activations,
            "outputs": [o.to_dict() for o in self.outputs],
            "problems": list(self.problems),
            "passed": self.passed,
        }


@dataclass(frozen=True)
class QatExportResult(Printable):
    """What `export_qat` wrote and how it checked it.

    Attributes:
        path: The file (written only when the check passed).
        format: The target's name (``"onnx"``, ``"litert"``).
        opset: The format version (ONNX opset, LiteRT schema).
        op_counts: Op type → count in the written graph.
        runtime_op_counts: ONNX: the op counts of ONNX Runtime's optimized
            graph (its fused integer kernels); None for LiteRT, whose file
            already holds the integer kernels.
        size: Bytes of the file.
        passes: The graph passes that changed the graph, in order.
        check: The `IntegerCheck` (empty with verification off).
    """

    path: Path
    format: str
    opset: int
    op_counts: dict[str, int]
    runtime_op_counts: dict[str, int] | None = None
    size: int = 0
    passes: tuple[str, ...] = ()
    check: IntegerCheck = field(default_factory=IntegerCheck)

    @property
    def verified(self) -> bool:
        return bool(self.check.outputs) and self.check.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``kerasbn export --format json``)."""
        return {
            "format": self.format,
            "path": str(self.path),
            "quantization_aware": True,
            "opset": self.opset,
            "op_counts": dict(self.op_counts),
            "runtime_op_counts": None if self.runtime_op_counts is None else dict(self.runtime_op_counts),
            "size": self.size,
            "passes": list(self.passes),
            "verified": self.verified,
            "check": self.check.to_dict(),
        }

    def view(self) -> list[Table | str]:
        """The op table, ONNX Runtime's integer kernels, the passes and the check, one line each."""
        from kerasbn.deploy.target import targets
        from kerasbn.report import file_size

        title = targets()[self.format].describe(self.path.name, self.opset)
        rows = [(op, str(n)) for op, n in sorted(self.op_counts.items())] + [("Model size", file_size(self.size))]
        table = Table(
            title=f"{title}, int8 from the quantization-aware model",
            headers=("Op", "Count"),
            rows=rows,
            numeric=(1,),
            title_justify="left",
        )
        return [table, *self.lines()]

    def lines(self) -> list[str]:
        """The check, one line per finding, for the command line."""
        runtime = "LiteRT" if self.format == "litert" else "ONNX Runtime"
        out = []
        if self.runtime_op_counts is not None:
            fused = {k: v for k, v in sorted(self.runtime_op_counts.items()) if k.startswith(("QLinear", "QGemm"))}
            shown = ", ".join(f"{k} {v}" for k, v in fused.items()) or "none"
            out.append(f"{runtime}'s optimized graph: integer kernels {shown}")
        if self.passes:
            out.append(f"Graph passes that changed it: {', '.join(self.passes)}")
        if not self.check.outputs:
            return [*out, "Not verified (--no-verify)."]
        out.append(
            f"Integer weights equal to the trained grid: {len(self.check.weights)} kernel(s); "
            f"activation ranges found: {self.check.activations}"
        )
        for o in self.check.outputs:
            top1 = (
                ""
                if o.top1 is None
                else f", top-1 {100 * o.top1:.1f} % ({100 * o.decisive_top1:.1f} % of decisive rows)"
            )
            verdict = "ok" if o.passed else "FAILED"
            out.append(f"{runtime} vs the simulated model, {o.case}: max {o.max_lsb:.2g} output steps{top1}: {verdict}")
        return out


class QatVerificationError(VerificationError):
    """The int8 file is not the quantization-aware model; `result` holds the numbers (nothing was written)."""

    def __init__(self, message: str, result: QatExportResult) -> None:
        super().__init__(message)
        self.result = result


def export_qat(
    model: Any,
    path: str | os.PathLike,
    *,
    to: str | None = None,
    checks: Any = None,
    opset: int | None = None,
    optimize: bool = True,
    overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> QatExportResult:
    """Write the int8 file of a quantization-aware model from its learned grids and ranges, checked first.

    `kerasbn.export` calls this for a model with quantization-aware layers
    (`kerasbn.ops.fake_quant.is_quantization_aware`); no calibration data is needed.

    Args:
        model: A model from `kerasbn.qat.prepare` (trained, frozen or not), TensorFlow backend.
        path: The file (``.tflite`` or ``.onnx``; `to` names the format otherwise).
        to: ``"litert"`` or ``"onnx"``.
        checks: `kerasbn.deploy.verify.Checks`: the check inputs (the user's,
            else random at its batch sizes) or ``verify=False``.
        opset: The ONNX opset (13 or later: per-channel ``QuantizeLinear``).
        optimize: Run the QDQ graph passes (ONNX); without them ONNX Runtime
            runs float kernels between Q/DQ pairs.
        overwrite: Replace an existing `path`.
        on_step: Called with a short description before each long step.

    Raises:
        QatVerificationError: The file's weights, ranges or outputs are not the model's; nothing written.
        kerasbn.errors.UnsupportedModelError: The model cannot be converted, or
            its weights cannot be stored on their grid in this format.
        kerasbn.errors.KerasbnError: Bad options, or the output path exists or is not writable.
    """
    from dataclasses import replace

    from kerasbn.deploy.files import atomic_output, check_output_path
    from kerasbn.deploy.target import target_for
    from kerasbn.deploy.verify import Checks
    from kerasbn.model_signature import signature

    step = on_step or (lambda _message: None)
    path = Path(path)
    target = target_for(path, to)
    target.check_backend()
    if opset is not None and target.name != "onnx":
        raise KerasbnError(f"opset applies to ONNX only, not {target.title}")
    if opset is not None and opset < MIN_OPSET:
        raise KerasbnError(
            f"an int8 ONNX file needs opset {MIN_OPSET} or later (per-channel QuantizeLinear), not {opset}"
        )
    check_output_path(path, overwrite)
    checks = checks or Checks()
    sig = signature(model)
    if checks.inputs is not None:
        checks = replace(checks, inputs=sig.pack(sig.conform(checks.inputs, "inputs")))
    _refuse_unfaithful(model, target.name)
    steps = _output_steps(model) if checks.verify else None

    step(f"Converting the quantization-aware model to int8 {target.title}")
    graph, passes = convert(model, target.name, sig, opset=opset, optimize=optimize)
    content = target.serialize(graph)
    runtime_ops = target.guarded(lambda: optimized_op_counts(content)) if target.name == "onnx" else None
    result = QatExportResult(
        path=path,
        format=target.name,
        opset=target.version(graph),
        op_counts=target.op_counts(graph),
        runtime_op_counts=runtime_ops,
        size=len(content),
        passes=passes,
    )
    if checks.verify:
        step(f"Checking the int8 file with {target.runtime} against the simulated model")
        check = target.guarded(lambda: check_file(model, target.name, content, sig, checks, steps))
        result = replace(result, check=check)
        if not check.passed:
            raise QatVerificationError(
                f"the int8 file is not the quantization-aware model: {check.failure()}; nothing written", result
            )
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(content)
    return result


def convert(
    model: Any, to: str, sig: Any = None, *, opset: int | None = None, optimize: bool = True
) -> tuple[Any, tuple[str, ...]]:
    """The int8 graph of a quantization-aware model (LiteRT bytes or an ONNX proto), unchecked; the passes that changed it."""
    from kerasbn.model_signature import signature
    from kerasbn.ops.fake_quant import lowering

    sig = sig or signature(model)
    if to == "litert":
        from kerasbn.deploy.litert import to_litert
        from kerasbn.ops.fake_quant import frozen_weights

        with frozen_weights():
            return to_litert(model, sig, learned_ranges=True), ()
    from kerasbn.deploy.onnx import op_counts, to_onnx
    from kerasbn.deploy.onnx_passes import QDQ_PASSES

    with lowering("qdq"):
        graph = to_onnx(model, sig, opset=opset or MIN_OPSET)
    changed = []
    for name, transform in QDQ_PASSES if optimize else ():
        before = op_counts(graph)
        graph = transform(graph)
        if op_counts(graph) != before:
            changed.append(name)
    return graph, tuple(changed)


def optimized_op_counts(content: bytes) -> dict[str, int]:
    """Op type → count in ONNX Runtime's optimized graph of an ONNX file (its fused kernels: QLinearConv...).

    The extended level: the QDQ fusions, without the hardware-specific
    layout transforms of the highest level.
    """
    import onnx
    import onnxruntime as ort

    from kerasbn.deploy.onnx import op_counts

    with tempfile.TemporaryDirectory(prefix="kerasbn-ort-") as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        return op_counts(onnx.load(options.optimized_model_filepath))


def check_file(
    model: Any, to: str, content: bytes, sig: Any, checks: Any, steps: Sequence[float] | None = None
) -> IntegerCheck:
    """The int8 file ``content`` judged against the quantization-aware ``model`` (see the module docstring).

    Args:
        model: The quantization-aware model.
        to: ``"litert"`` or ``"onnx"``.
        content: The file's bytes.
        sig: The model's `kerasbn.model_signature.Signature`.
        checks: `kerasbn.deploy.verify.Checks`: its input cases.
        steps: The output quantizers' steps (`_output_steps`); worked out when None.
    """
    from kerasbn.deploy.target import targets
    from kerasbn.deploy.verify import keras_outputs

    target = targets()[to]
    problems = []
    if to == "litert":
        from kerasbn.deploy.int8_file import litert_activations, litert_weights

        found, ranges = litert_weights(content), litert_activations(content)
    else:
        from kerasbn.deploy.int8_file import onnx_activations, onnx_weights

        graph = target.load(content)
        found, ranges = onnx_weights(graph), onnx_activations(graph)
    matched = []
    for label, bits, grid in _grids(model):
        if any(_same_grid(grid, tensor) for tensor in found):
            matched.append(label)
        else:
            problems.append(f"the {bits}-bit integer weights of {label} are not in the file on their trained grid")
    activations = 0
    for quantizer in activation_quantizers(model):
        scale, zero = _nudged(quantizer)
        if any(z == zero and abs(s - scale) <= SCALE_RTOL * scale for s, z in ranges):
            activations += 1
        else:
            problems.append(
                f"the range of activation quantizer '{quantizer.name}' (step {scale:.6g}, zero point {zero}) "
                "is not in the file"
            )
    steps = steps if steps is not None else _output_steps(model)
    run = target.runner(content, sig)
    outputs = []
    for label, arrays in _cases(checks, sig):
        expected = keras_outputs(model, sig.pack(list(arrays)))
        got = [np.asarray(y, np.float64) for y in run(arrays)]
        worst = max(float(np.max(np.abs(z - y), initial=0.0)) / s for y, z, s in zip(expected, got, steps))
        top1, decisive = [], []
        for y, z, s in zip(expected, got, steps):
            if y.ndim != 2 or y.shape[-1] < 2:
                continue
            same = np.argmax(y, axis=-1) == np.argmax(z, axis=-1)
            top_two = np.sort(y, axis=-1)[:, -2:]
            clear = top_two[:, 1] - top_two[:, 0] > 2 * MAX_LSB * s
            top1.append(float(np.mean(same)))
            decisive.append(float(np.mean(same[clear])) if clear.any() else 1.0)
        outputs.append(
            OutputCheck(
                case=label,
                batch_size=int(arrays[0].shape[0]),
                max_lsb=worst,
                top1=min(top1) if top1 else None,
                decisive_top1=min(decisive) if decisive else None,
            )
        )
    return IntegerCheck(
        weights=tuple(matched), activations=activations, outputs=tuple(outputs), problems=tuple(problems)
    )


def _cases(checks: Any, sig: Any) -> list[tuple[str, list[np.ndarray]]]:
    if checks.inputs is not None:
        arrays = sig.flatten(checks.inputs)
        return [("inputs", arrays), ("inputs, first row", [a[:1] for a in arrays])]
    return [(f"batch {b}", sig.random(b, checks.seed + k)) for k, b in enumerate(checks.batch_sizes)]


def weight_quantized(model: Any) -> list[Any]:
    """Every layer of the weight fake-quant protocol (`kerasbn.ops.fake_quant.is_weight_quantized`), at any depth."""
    from kerasbn.ops.fake_quant import is_weight_quantized

    return [layer for layer in model._flatten_layers(include_self=False, recursive=True) if is_weight_quantized(layer)]


def activation_quantizers(model: Any) -> list[Any]:
    """Every activation quantizer (`kerasbn.ops.fake_quant.is_activation_quantizer`), at any depth."""
    from kerasbn.ops.fake_quant import is_activation_quantizer

    return [
        layer for layer in model._flatten_layers(include_self=False, recursive=True) if is_activation_quantizer(layer)
    ]


def _grids(model: Any) -> list[tuple[str, int, tuple[np.ndarray, np.ndarray, int | None]]]:
    """(label, bits, grid) of every integer kernel, a separable layer's depthwise stage too."""
    out = []
    for layer in weight_quantized(model):
        out.append((f"'{layer.name}'", layer.weight_bits, layer.weight_grid()))
        if getattr(layer, "activation_quantizer", None) is not None:  # separable: its depthwise stage too
            out.append((f"'{layer.name}' (depthwise stage)", layer.weight_bits, layer.weight_grid("depthwise_kernel")))
    return out


def _nudged(quantizer: Any) -> tuple[float, int]:
    """(step, unsigned zero point) of an activation quantizer, its range nudged as TensorFlow's FakeQuant does."""
    low, _, step = (np.float64(np.asarray(v)) for v in quantizer.nudged_range())
    return float(step), int(np.rint(-low / step))


def _same_grid(grid: tuple[np.ndarray, np.ndarray, int | None], tensor: Any) -> bool:
    """Whether the file's integer tensor is the grid ``(q, scale, axis)`` in one of the layouts a runtime uses.

    The grid's channel axis is last; a file puts it first (LiteRT's
    ``(out, kh, kw, in)``, ONNX's ``(out, in, kh, kw)``, a depthwise
    ``(in·mult, 1, kh, kw)``), or keeps the Keras layout (a MatMul weight,
    LiteRT's depthwise ``(1, kh, kw, in·mult)``).
    """
    q, scale, axis = grid
    if tensor.values.size != q.size:
        return False
    if (axis is None) != (tensor.axis is None) or scale.size != tensor.scale.size:
        return False
    if not np.allclose(tensor.scale, scale, rtol=SCALE_RTOL, atol=0):
        return False
    layouts = [q, np.moveaxis(q, -1, 0)]
    if q.ndim >= 2:
        layouts.append(np.transpose(q, (q.ndim - 1, q.ndim - 2, *range(q.ndim - 2))))
    for layout in layouts:
        if np.array_equal(layout.reshape(tensor.values.shape), tensor.values):
            return True
    return False


def _output_steps(model: Any) -> list[float]:
    """The step of the activation quantizer that makes each output (in `keras.tree.flatten` order).

    The file's outputs are that quantizer's integers dequantized, so its step
    is the unit the comparison counts in.

    Raises:
        UnsupportedModelError: An output is not made by an activation quantizer.
    """
    import keras

    from kerasbn.ops.fake_quant import is_activation_quantizer

    steps = []
    for tensor in keras.tree.flatten(model.outputs):
        layer = _producer(tensor)
        if layer is None or not is_activation_quantizer(layer):
            made_by = "nothing" if layer is None else f"'{layer.name}' ({type(layer).__name__})"
            raise UnsupportedModelError(
                f"output '{tensor.name}' of '{model.name}' is made by {made_by}, not an activation quantizer: "
                "its int8 step is not known; prepare the model with kerasbn.qat.prepare"
            )
        steps.append(_nudged(layer)[0])
    return steps


# Layers that move elements without changing them: an output behind them keeps its quantizer's step.
_LAYOUT_LAYERS = ("Reshape", "Flatten", "Permute", "Identity", "Cropping1D", "Cropping2D", "Cropping3D")


def _producer(tensor: Any) -> Any:
    """The layer whose output ``tensor`` is, looking through nested models and layout-only layers."""
    import keras

    history = getattr(tensor, "_keras_history", None)
    while history is not None:
        layer, node_index, tensor_index = history
        if hasattr(layer, "outputs") and hasattr(layer, "layers") and layer.outputs:
            history = getattr(keras.tree.flatten(layer.outputs)[tensor_index], "_keras_history", None)
            continue
        if type(layer).__name__ in _LAYOUT_LAYERS:
            inputs = keras.tree.flatten(layer._inbound_nodes[node_index].input_tensors) if layer._inbound_nodes else []
            history = getattr(inputs[0], "_keras_history", None) if len(inputs) == 1 else None
            continue
        return layer
    return None


def _refuse_unfaithful(model: Any, to: str) -> None:
    """Refuse, before converting, the weights a format cannot store on their grid.

    Raises:
        UnsupportedModelError: LiteRT and a kernel below `LITERT_MIN_WEIGHT_BITS` bits.
    """
    if to != "litert":
        return
    for layer in weight_quantized(model):
        if layer.weight_bits < LITERT_MIN_WEIGHT_BITS:
            levels = 2 ** (layer.weight_bits - 1) - 1
            raise UnsupportedModelError(
                f"'{layer.name}' has {layer.weight_bits}-bit weights, which LiteRT's converter stores on the "
                f"4-bit grid (scale max|w|/7, not max|w|/{levels}): the file would not hold the trained weights; "
                "export to ONNX, or prepare with weight_bits ≥ 4"
            )
