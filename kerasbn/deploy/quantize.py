"""int8 post-training quantization after the fold, and the audit of what the fold does to weight ranges.

`export_int8` folds BN, exports and verifies the float file (`export_onnx` or
`export_litert`), then quantizes it statically with calibration data:

- ONNX: ONNX Runtime's `quantize_static`, QDQ format, int8 activations and
  per-channel int8 weights in a 7-bit range (see `quantize_onnx`);
- LiteRT: the converter's full-integer quantization with the calibration rows
  as representative dataset (int8 builtin ops only, float32 inputs and outputs).

A quantized model cannot match the float one to float tolerances, so it is
judged differently: on the calibration rows (and the user's inputs) the top-1
class of every classification output must agree with the float Keras model on
at least `min_agreement` of the rows; the errors relative to ``max |y|``, the
sizes and latencies are reported. Nothing is written when it falls short.

`audit_quantization` explains why per-channel weights matter after a fold: the
fold multiplies each output channel of a kernel by its own ``γ/σ``, so the
channel ranges spread apart and one per-tensor step no longer suits them all.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kerasbn.deploy.files import atomic_output, check_output_path
from kerasbn.errors import KerasbnError, UnsupportedModelError, VerificationError
from kerasbn.report import Agreement, Int8Report, QuantizationAudit, WeightRange

FORMATS = {".onnx": "onnx", ".tflite": "litert"}
DEFAULT_MIN_AGREEMENT = 0.99
# Widest / narrowest channel range above which per-tensor int8 is flagged: the
# narrowest channel keeps fewer than 127/8 ≈ 16 levels (3 of its 7 magnitude bits lost).
DEFAULT_RANGE_THRESHOLD = 8.0


class QuantizationError(VerificationError):
    """The int8 model disagrees with the float model too often; `result` holds the numbers (nothing was written)."""

    def __init__(self, message: str, result: Int8Report) -> None:
        super().__init__(message)
        self.result = result


def format_of(path: str | os.PathLike, to: str | None = None) -> str:
    """``"onnx"`` or ``"litert"``: `to` when given (it must agree with a known suffix), else the suffix."""
    suffix = Path(path).suffix.lower()
    implied = FORMATS.get(suffix)
    if to is not None:
        if to not in FORMATS.values():
            raise KerasbnError(f"unknown export format '{to}'; use onnx or litert")
        if implied is not None and implied != to:
            raise KerasbnError(f"{path}: a '{suffix}' file is not {to}; use the {_suffix(to)} suffix")
        return to
    if implied is None:
        raise KerasbnError(f"{path}: cannot tell the format from '{suffix or 'no suffix'}'; use .onnx or .tflite")
    return implied


def _suffix(fmt: str) -> str:
    return next(s for s, f in FORMATS.items() if f == fmt)


def export_int8(
    model: Any,
    path: str | os.PathLike,
    calibration: Any,
    *,
    to: str | None = None,
    inputs: Any = None,
    inputs_label: str = "inputs",
    fold: bool = True,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    verify: bool = True,
    overwrite: bool = False,
    batch_sizes: Sequence[int] = (1, 8),
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> Int8Report:
    """Fold, export and verify the float model, quantize it to int8 with calibration data, and check it.

    Args:
        model: a functional or Sequential `keras.Model` (TensorFlow backend).
        path: the `.onnx` or `.tflite` file to write (atomically).
        calibration: calibration inputs in the structure the model takes (as
            `kerasbn.deploy.files.load_inputs` returns them), a few hundred
            representative rows; also the first set the int8 model is judged on.
        to: ``"onnx"`` or ``"litert"``; from `path`'s suffix when None.
        inputs: more inputs to judge the int8 model on (and to verify the float export with).
        inputs_label: the name of `inputs` in the report (e.g. the file name).
        fold: fold BatchNormalization first (`kerasbn.fold`).
        min_agreement: the top-1 agreement with the float Keras model each
            classification output must reach on every input set.
        verify: check the float export in its runtime before quantizing.
        batch_sizes: the batch sizes of that check.
        atol: the element-wise tolerance of that check (see `kerasbn.export_onnx`).
        rtol: the relative tolerance of that check.
        seed: seed of that check's random inputs.
        overwrite: replace an existing `path`.
        on_step: called with a short description before each long step.

    Returns:
        An `Int8Report`.

    Raises:
        QuantizationError: the int8 model falls short of `min_agreement`; nothing is written.
        kerasbn.deploy.onnx.ExportVerificationError: the float export disagrees with Keras.
        UnsupportedModelError: the model cannot be converted or quantized.
        KerasbnError: bad calibration data, or the output path is not writable or exists.
    """
    import keras

    step = on_step or (lambda _message: None)
    path = Path(path)
    fmt = format_of(path, to)
    check_output_path(path, overwrite)
    if not 0.0 <= min_agreement <= 1.0:
        raise KerasbnError(f"min_agreement must be between 0 and 1, not {min_agreement}")
    rows = conform(model, calibration, "calibration data")
    sets = [("calibration", rows)]
    if inputs is not None:
        inputs = keras.tree.pack_sequence_as(model.input, conform(model, inputs, inputs_label))
        sets.append((inputs_label, keras.tree.flatten(inputs)))
    checking = {
        "fold": fold,
        "verify": verify,
        "batch_sizes": batch_sizes,
        "inputs": inputs,
        "atol": atol,
        "rtol": rtol,
        "seed": seed,
        "on_step": on_step,
    }
    with tempfile.TemporaryDirectory(prefix="kerasbn-int8-") as folder:
        float_path = Path(folder) / f"float32{_suffix(fmt)}"
        int8_path = Path(folder) / f"int8{_suffix(fmt)}"
        if fmt == "onnx":
            from kerasbn.deploy.onnx import export_onnx
            from kerasbn.deploy.runtime import onnx_runner

            float_export = export_onnx(model, float_path, **checking)
            step("Quantizing to int8 with ONNX Runtime")
            quantize_onnx(float_path, int8_path, rows)
            runners = onnx_runner(float_path), onnx_runner(int8_path)
            import onnx

            from kerasbn.deploy.onnx import op_counts

            counts = op_counts(onnx.load(str(int8_path)))
        else:
            from kerasbn.deploy import litert
            from kerasbn.deploy.runtime import litert_runner
            from kerasbn.folding.fold import fold as fold_model

            float_export = litert.export_litert(model, float_path, **checking)
            step("Quantizing to int8 with the LiteRT converter")
            target = fold_model(model).model if fold else model
            int8_path.write_bytes(litert.to_litert(target, representative=_samples(rows)))
            names = litert.input_names(model)
            runners = litert_runner(float_path, names), litert_runner(int8_path, names)
            counts = litert.op_counts(int8_path.read_bytes())
        step("Comparing the int8 model with the float model")
        agreements = tuple(_agreement(model, runners[1], label, arrays) for label, arrays in sets)
        one_row = [a[:1] for a in rows]
        report = Int8Report(
            path,
            fmt,
            agreements,
            min_agreement,
            float_path.stat().st_size,
            int8_path.stat().st_size,
            _latency(runners[0], one_row),
            _latency(runners[1], one_row),
            dict(float_export.op_counts),
            counts,
            float_export,
        )
        if not report.passed:
            worst = min((a for a in agreements if a.top1 is not None), key=lambda a: a.top1)
            raise QuantizationError(
                f"the int8 model agrees with the float model's top-1 class on {100 * worst.top1:.2f} % of the "
                f"{worst.dataset} rows, below the required {100 * min_agreement:.2f} %; nothing written",
                report,
            )
        with atomic_output(path, overwrite=overwrite) as tmp:
            tmp.write_bytes(int8_path.read_bytes())
    return report


def quantize_onnx(source: str | os.PathLike, destination: str | os.PathLike, calibration: Sequence[np.ndarray]) -> None:
    """Static int8 quantization of an ONNX file with ONNX Runtime: QDQ, int8 activations, per-channel 7-bit weights.

    `calibration` is the list of input arrays in the graph's input order.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    options = ort.SessionOptions()
    options.log_severity_level = 3
    names = [i.name for i in ort.InferenceSession(str(source), options).get_inputs()]

    class Reader(CalibrationDataReader):
        """The calibration rows in batches (the graph's batch dimension is dynamic)."""

        def __init__(self) -> None:
            n = calibration[0].shape[0]
            self._batches = iter({name: a[i : i + 64] for name, a in zip(names, calibration)} for i in range(0, n, 64))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    prepared = Path(destination).with_name(f"prepared-{Path(destination).name}")
    try:
        # ONNX Runtime's recommended pre-processing: graph optimization and shape
        # inference, so the quantizer sees every tensor's shape. Symbolic shape
        # inference (it needs sympy) is not needed: only the batch is dynamic.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(destination),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # 7-bit weights: x86 CPUs without VNNI (AVX2 ones) multiply int8
            # pairs with a saturating 16-bit add, which flipped up to 1 % of
            # the digits demo's classes; ONNX Runtime recommends this there.
            reduce_range=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    except Exception as exc:  # the quantizer raises many exception types for graphs it cannot handle
        raise UnsupportedModelError(f"ONNX Runtime cannot quantize the model: {_first_line(exc)}") from exc
    finally:
        prepared.unlink(missing_ok=True)


def conform(model: Any, data: Any, what: str) -> list[np.ndarray]:
    """`data` (in the model's input structure) as a flat list of arrays of the inputs' dtypes.

    Raises:
        KerasbnError: the arrays do not match the model's inputs or hold no rows.
    """
    import keras

    arrays = [np.asarray(a) for a in keras.tree.flatten(data)]
    tensors = list(model.inputs)
    if len(arrays) != len(tensors):
        raise KerasbnError(f"{what}: {len(arrays)} array(s) for a model with {len(tensors)} input(s)")
    rows = {a.shape[0] if a.ndim else None for a in arrays}
    if len(rows) != 1 or None in rows:
        raise KerasbnError(f"{what}: the arrays need the same number of rows along the first axis")
    if rows == {0}:
        raise KerasbnError(f"{what}: holds no rows")
    out = []
    for a, t in zip(arrays, tensors):
        expected = tuple(t.shape[1:])
        if a.ndim != len(expected) + 1 or any(e is not None and e != g for e, g in zip(expected, a.shape[1:])):
            raise KerasbnError(f"{what}: an array has shape {a.shape}, the model expects (batch, *{expected})")
        dtype = np.dtype(keras.backend.standardize_dtype(t.dtype))
        if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(a)):
            raise KerasbnError(f"{what}: holds NaN or infinite values")
        out.append(a.astype(dtype, copy=False))
    return out


def _samples(rows: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """One representative sample per calibration row, a batch of one each (the converter's calibrator feeds them so)."""
    return [[a[i : i + 1] for a in rows] for i in range(rows[0].shape[0])]


def _agreement(model: Any, run: Callable, label: str, arrays: Sequence[np.ndarray]) -> Agreement:
    import keras

    from kerasbn.deploy.verify import keras_outputs

    expected = keras_outputs(model, keras.tree.pack_sequence_as(model.input, list(arrays)))
    got = [np.asarray(y, np.float64) for y in run(arrays)]
    top1 = [
        float(np.mean(np.argmax(y, axis=-1) == np.argmax(z, axis=-1)))
        for y, z in zip(expected, got)
        if y.ndim == 2 and y.shape[-1] >= 2
    ]
    diffs = np.concatenate([np.abs(z - y).ravel() for y, z in zip(expected, got)])
    reference = max(float(np.max(np.abs(y))) for y in expected)
    return Agreement(
        label,
        int(arrays[0].shape[0]),
        min(top1) if top1 else None,
        float(np.max(diffs)),
        float(np.mean(diffs)),
        reference,
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
    rows = []
    for finding in result.report.folded:
        prefix = finding.path.rpartition("/")[0]
        partner = f"{prefix}/{finding.partner}" if prefix else finding.partner
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
                    partner,
                    finding.layer,
                    name,
                    _per_channel(before, name, new).shape[1],
                    ratio_before,
                    ratio_after,
                    ratio_after > threshold,
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."
