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

The check (`kerasbn.deploy.qat_check.check_file`) runs before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kerasbn.deploy.qat_check import IntegerCheck, check_file, output_steps, weight_quantized
from kerasbn.errors import KerasbnError, UnsupportedModelError, VerificationError
from kerasbn.printable import Printable, Table

# LiteRT keeps the grid of 4- to 8-bit weights (INT4 storage at 4 bits); a
# 3-bit or 2-bit kernel is stored on the 4-bit grid (scale max|w|/7).
LITERT_MIN_WEIGHT_BITS = 4
# Per-channel QuantizeLinear/DequantizeLinear (their axis) came with opset 13.
MIN_OPSET = 13


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
        check: The `kerasbn.deploy.qat_check.IntegerCheck` (empty with verification off).
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
            layers = (
                ""
                if o.layer_lsb is None
                else f"; layer by layer on the file's inputs max {o.layer_lsb:.2g} step(s) over {o.layers} layers"
            )
            verdict = "ok" if o.passed else "FAILED"
            out.append(
                f"{runtime} vs the simulated model, {o.case}: max {o.max_lsb:.2g} output steps{top1}{layers}: {verdict}"
            )
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
    steps = output_steps(model) if checks.verify else None

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


def _refuse_unfaithful(model: Any, to: str) -> None:
    """Refuse, before converting, what a format cannot hold as it was trained.

    Raises:
        UnsupportedModelError: LiteRT and a kernel below `LITERT_MIN_WEIGHT_BITS`
            bits, or a LeakyReLU: LiteRT's int8 LEAKY_RELU multiplies by α in
            fixed point and rounds negative inputs off round-to-nearest (flips
            at −0.47…−0.49 of a step, measured on keras-hub's CSPNet), one step
            per layer that adds up to 4–6 output steps, where the
            simulation rounds α·x to nearest.
    """
    if to != "litert":
        return
    for layer in model._flatten_layers(include_self=False, recursive=True):
        activation = getattr(getattr(layer, "layer", layer), "activation", None)
        if type(layer).__name__ == "LeakyReLU" or getattr(activation, "__name__", None) == "leaky_relu":
            raise UnsupportedModelError(
                f"'{layer.name}' applies LeakyReLU, which LiteRT's int8 kernel rounds off the trained model's "
                "grid (negative inputs, one step per layer): the file would not be the trained model; "
                "export to ONNX, or train with ReLU/ReLU6"
            )
    for layer in weight_quantized(model):
        if layer.weight_bits < LITERT_MIN_WEIGHT_BITS:
            levels = 2 ** (layer.weight_bits - 1) - 1
            raise UnsupportedModelError(
                f"'{layer.name}' has {layer.weight_bits}-bit weights, which LiteRT's converter stores on the "
                f"4-bit grid (scale max|w|/7, not max|w|/{levels}): the file would not hold the trained weights; "
                "export to ONNX, or prepare with weight_bits ≥ 4"
            )
