"""The int8 step of the export pipeline, and the audit of what the fold does to weight ranges.

`kerasbn.export` with ``int8=calibration`` folds BN, exports and verifies the
float file, then has the target quantize it statically with the calibration
rows (`kerasbn.deploy.target.Target.quantize`):

- ONNX: ONNX Runtime's `quantize_static`, QDQ format, int8 activations and
  per-channel int8 weights in a 7-bit range (`kerasbn.deploy.onnx.quantize_onnx`);
- LiteRT: the converter's full-integer quantization with the calibration rows
  as representative dataset (int8 builtin ops only, float32 inputs and outputs).

A quantized model cannot match the float one to float tolerances, so
`int8_report` judges it differently: on the calibration rows (and the user's
inputs) the top-1 class of every classification output must agree with the
float Keras model on at least `min_agreement` of the rows; the errors relative
to ``max |y|``, the sizes and latencies are reported.

`audit_quantization` explains why per-channel weights matter after a fold: the
fold multiplies each output channel of a kernel by its own ``γ/σ``, so the
channel ranges spread apart and one per-tensor step no longer suits them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kerasbn.deploy.reports import Agreement, Int8Report, QuantizationAudit, WeightRange
from kerasbn.errors import VerificationError

DEFAULT_MIN_AGREEMENT = 0.99
# Widest / narrowest channel range above which per-tensor int8 is flagged: the
# narrowest channel keeps fewer than 127/8 ≈ 16 levels (3 of its 7 magnitude bits lost).
DEFAULT_RANGE_THRESHOLD = 8.0


class QuantizationError(VerificationError):
    """The int8 model disagrees with the float model too often; `result` holds the numbers (nothing was written)."""

    def __init__(self, message: str, result: Int8Report) -> None:
        super().__init__(message)
        self.result = result


def int8_report(
    model: Any,
    sig: Any,
    *,
    float_export: Any,
    quantized: bytes,
    sets: Sequence[tuple[str, Sequence[np.ndarray]]],
    path: Path,
    min_agreement: float,
) -> Int8Report:
    """The int8 file (``quantized``) judged against the float Keras ``model`` on every input set.

    ``float_export`` is the checked float file it was quantized from (its
    `kerasbn.deploy.export.ExportResult`, at a path that still exists); ``path``
    is where the int8 file is to be written (reported).

    Raises:
        QuantizationError: the top-1 agreement falls short of ``min_agreement`` on a set.
    """
    target = float_export.target
    int8_runner = target.runner(quantized, sig)
    agreements = tuple(_agreement(model, sig, int8_runner, label, arrays) for label, arrays in sets)
    one_row = [a[:1] for a in sets[0][1]]
    report = Int8Report(
        path=path,
        format=target.name,
        agreements=agreements,
        min_agreement=min_agreement,
        size_float=float_export.size,
        size_int8=len(quantized),
        latency_float_ms=_latency(target.runner(float_export.path, sig), one_row),
        latency_int8_ms=_latency(int8_runner, one_row),
        op_counts_float=dict(float_export.op_counts),
        op_counts_int8=target.op_counts(target.load(quantized)),
        float_export=float_export,
    )
    if not report.passed:
        worst = min((a for a in agreements if a.top1 is not None), key=lambda a: a.top1)
        raise QuantizationError(
            f"the int8 model agrees with the float model's top-1 class on {100 * worst.top1:.2f} % of the "
            f"{worst.dataset} rows, below the required {100 * min_agreement:.2f} %; nothing written",
            report,
        )
    return report


def _agreement(model: Any, sig: Any, run: Callable, label: str, arrays: Sequence[np.ndarray]) -> Agreement:
    from kerasbn.deploy.outputs import keras_outputs

    expected = keras_outputs(model, sig.pack(list(arrays)))
    got = [np.asarray(y, np.float64) for y in run(arrays)]
    top1 = [
        float(np.mean(np.argmax(y, axis=-1) == np.argmax(z, axis=-1)))
        for y, z in zip(expected, got)
        if y.ndim == 2 and y.shape[-1] >= 2
    ]
    diffs = np.concatenate([np.abs(z - y).ravel() for y, z in zip(expected, got)])
    reference = max(float(np.max(np.abs(y))) for y in expected)
    return Agreement(
        dataset=label,
        samples=int(arrays[0].shape[0]),
        top1=min(top1) if top1 else None,
        max_abs_error=float(np.max(diffs)),
        mean_abs_error=float(np.mean(diffs)),
        max_abs_reference=reference,
    )


def _latency(run: Callable, arrays: Sequence[np.ndarray]) -> float:
    from kerasbn.deploy.runtime import median_latency

    return median_latency(run, arrays)


def audit_quantization(
    model: Any, fold_result: Any = None, *, threshold: float = DEFAULT_RANGE_THRESHOLD
) -> QuantizationAudit:
    """For each fold, how far the per-output-channel weight ranges of the partner spread apart.

    Args:
        model: the original Keras model.
        fold_result: `kerasbn.fold(model)`'s result; computed when None.
        threshold: flag a layer whose widest channel range exceeds its narrowest
            by more than this factor after the fold.

    Returns:
        A `QuantizationAudit`, one `WeightRange` per kernel a fold rescaled.

    Examples:
        >>> import keras, numpy as np, kerasbn
        >>> from kerasbn.deploy.quantize import audit_quantization
        >>> x = keras.Input((4,))
        >>> bn = keras.layers.BatchNormalization()
        >>> model = keras.Model(x, bn(keras.layers.Dense(2, kernel_initializer="ones")(x)))
        >>> _ = bn.moving_variance.assign(np.array([1.0, 1e-4], "float32"))
        >>> audit_quantization(model).layers[0].flagged
        True
    """
    from kerasbn.folding.fold import fold

    result = fold_result if fold_result is not None else fold(model)
    before_layers, after_layers = _layers_by_path(model), _layers_by_path(result.model)
    if len(before_layers) == len(after_layers) and list(before_layers) != list(after_layers):
        # A fold in place of a model Keras cannot rebuild (subclassed) works on a copy whose layers
        # are the same, in the same places, under new names (conv2d_1).
        after_layers = dict(zip(before_layers, after_layers.values()))
    rows = []
    for finding in result.report.folded:
        prefix = finding.path.rpartition("/")[0]
        partner = f"{prefix}/{finding.partner}" if prefix else finding.partner
        partner = partner.removeprefix(f"{model.name}/")  # the traced view puts the model's own name first
        before, after = before_layers.get(partner), after_layers.get(partner)
        if before is None or after is None:
            continue
        old = {w.path.rpartition("/")[2].split(":")[0]: np.asarray(w.numpy()) for w in before.weights}
        for weight in after.weights:
            name = weight.path.rpartition("/")[2].split(":")[0]
            new = np.asarray(weight.numpy())
            if not name.endswith("kernel") or name not in old or np.array_equal(old[name], new):
                continue
            ratio_before, ratio_after = _spread(before, name, old[name]), _spread(before, name, new)
            rows.append(
                WeightRange(
                    layer=partner,
                    bn=finding.layer,
                    weight=name,
                    channels=_per_channel(before, name, new).shape[1],
                    ratio_before=ratio_before,
                    ratio_after=ratio_after,
                    flagged=ratio_after > threshold,
                )
            )
    return QuantizationAudit(model.name, rows, threshold)


def _layers_by_path(model: Any) -> dict[str, Any]:
    """Every layer by its path through nested models (``outer/inner/layer``)."""
    out: dict[str, Any] = {}

    def visit(m: Any, prefix: str) -> None:
        for layer in m.layers:
            path = f"{prefix}{layer.name}"
            out[path] = layer
            if hasattr(layer, "layers"):
                visit(layer, f"{path}/")

    visit(model, "")
    return out


def _per_channel(layer: Any, name: str, kernel: np.ndarray) -> np.ndarray:
    """The kernel as a (taps, output channels) matrix (`Family.output_columns`); Dense's layout otherwise."""
    from kerasbn.folding.families import Dense, family_of

    return (family_of(layer) or Dense()).output_columns(name, kernel)


def _spread(layer: Any, name: str, kernel: np.ndarray) -> float:
    """Widest over narrowest per-channel range ``max |W_c|``, all-zero channels left out (they quantize exactly)."""
    ranges = np.max(np.abs(_per_channel(layer, name, np.asarray(kernel, np.float64))), axis=0)
    ranges = ranges[ranges > 0]
    return float(ranges.max() / ranges.min()) if ranges.size else 1.0
