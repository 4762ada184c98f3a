"""`kerasbn.export(int8=...)` and `kerasbn.audit_quantization`.

The int8 files are judged here by running them in ONNX Runtime and the LiteRT
interpreter ourselves against the float Keras model on held-out digits; the
audit's ranges against a kernel of ones, where the spread after the fold is
exactly the spread of the BN scales γ/√(σ²+ε).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy import quantize
from kerasbn.deploy.runtime import litert_runner, onnx_runner
from kerasbn.deploy.target import target_for
from kerasbn.deploy.verify import keras_outputs
from kerasbn.errors import KerasbnError
from tests.helpers import randomize_bn

SUFFIXES = {"onnx": ".onnx", "litert": ".tflite"}


@pytest.fixture(scope="module")
def digits_cnn():
    """The demo's BN CNN trained on scikit-learn's 8×8 digits; (model, calibration rows, held-out rows)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    x_train, x_test, y_train, _ = train_test_split(x, data.target, test_size=0.25, random_state=0, stratify=data.target)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    y = inputs
    for i, filters in enumerate((32, 64)):
        y = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(y)
        y = keras.layers.ReLU()(kerasbn.BatchNormalization(name=f"bn{i}")(y))
    y = keras.layers.Flatten()(keras.layers.MaxPooling2D()(y))
    y = keras.layers.ReLU()(kerasbn.BatchNormalization(name="bn_fc")(keras.layers.Dense(64, name="fc")(y)))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="classes")(y))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", jit_compile=True)
    model.fit(x_train, y_train.astype("int32"), batch_size=64, epochs=8, verbose=0)
    return model, x_train[:256], x_test


def _runner(fmt, path, model):
    return onnx_runner(path) if fmt == "onnx" else litert_runner(path, kerasbn.signature(model).names)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_int8_digits_cnn_agrees_with_the_float_model(fmt, digits_cnn, tmp_path):
    model, calibration, held_out = digits_cnn
    path = tmp_path / f"digits{SUFFIXES[fmt]}"

    report = kerasbn.export_int8(
        model, path, calibration, inputs=held_out, inputs_label="held-out", compare_unfolded=True
    )

    assert report.passed and report.format == fmt
    assert [a.dataset for a in report.agreements] == ["calibration", "held-out"]
    assert report.float_export.verified and report.float_export.fold_report.to_dict()["totals"]["folded"] == 3
    # The quality bar, measured here on the written file.
    float_classes = np.argmax(keras_outputs(model, held_out)[0], axis=1)
    int8_classes = np.argmax(_runner(fmt, path, model)([held_out])[0], axis=1)
    agreement = float(np.mean(float_classes == int8_classes))
    assert agreement >= 0.99, agreement
    assert report.agreements[1].top1 == agreement
    assert report.size_int8 == path.stat().st_size <= 0.30 * report.size_float
    assert report.latency_float_ms > 0 and report.latency_int8_ms > 0
    if fmt == "onnx":
        assert {"QuantizeLinear", "DequantizeLinear"} <= set(report.op_counts_int8)
    else:
        assert report.op_counts_int8.get("QUANTIZE", 0) >= 1  # float32 in, int8 inside
    # The three BNs (an ONNX BatchNormalization, or a LiteRT MUL and ADD, each) went into
    # the fold, not into quantized ops of their own.
    before, after = report.float_export.op_counts_unfolded, report.op_counts_float
    assert _bn_ops(after) <= _bn_ops(before) - 3 and "BatchNormalization" not in after, (before, after)


def _bn_ops(counts: dict[str, int]) -> int:
    return sum(counts.get(op, 0) for op in ("BatchNormalization", "Mul", "Add", "MUL", "ADD"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_falling_short_of_min_agreement_writes_nothing(fmt, tmp_path, monkeypatch):
    model = randomize_bn(_dense_bn_model())
    real = quantize._agreement

    def pessimist(*args):
        return dataclasses.replace(real(*args), top1=0.5)

    monkeypatch.setattr(quantize, "_agreement", pessimist)
    rows = np.random.default_rng(0).standard_normal((32, 6)).astype("float32")
    with pytest.raises(quantize.QuantizationError, match=r"50\.00 % of the calibration rows.*nothing written") as e:
        kerasbn.export_int8(model, tmp_path / f"m{SUFFIXES[fmt]}", rows)
    assert not e.value.result.passed
    assert list(tmp_path.iterdir()) == []


def _dense_bn_model() -> keras.Model:
    inputs = keras.Input((6,), name="x")
    return keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(5)(inputs)))


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (np.zeros((0, 6), "float32"), "holds no rows"),
        (np.zeros((4, 7), "float32"), r"shape \(4, 7\), the model expects \(batch, \*\(6,\)\)"),
        ([np.zeros((4, 6), "float32")] * 2, r"2 array\(s\) for a model with 1 input"),
        (np.full((4, 6), np.nan, "float32"), "NaN or infinite"),
    ],
    ids=["empty", "wrong_shape", "too_many_arrays", "nan"],
)
@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_bad_calibration_data_writes_nothing(fmt, calibration, message, tmp_path):
    with pytest.raises(KerasbnError, match=message):
        kerasbn.export_int8(_dense_bn_model(), tmp_path / f"m{SUFFIXES[fmt]}", calibration)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "to", "message"),
    [("m.pb", None, "cannot tell the format"), ("m.onnx", "litert", "use the .tflite suffix")],
)
def test_format_comes_from_the_suffix_or_agrees_with_it(name, to, message, tmp_path):
    with pytest.raises(KerasbnError, match=message):
        kerasbn.export_int8(_dense_bn_model(), tmp_path / name, np.zeros((4, 6), "float32"), to=to)
    assert target_for("a.TFLITE").name == "litert" and target_for("a", "onnx").name == "onnx"


LAYERS = {
    "dense": ((4,), lambda: keras.layers.Dense(6, kernel_initializer="ones")),
    "conv2d": ((5, 5, 2), lambda: keras.layers.Conv2D(6, 3, kernel_initializer="ones")),
    "conv2dtranspose": ((5, 5, 2), lambda: keras.layers.Conv2DTranspose(6, 3, kernel_initializer="ones")),
    "depthwise": ((5, 5, 3), lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, depthwise_initializer="ones")),
    "separable": (
        (5, 5, 2),
        lambda: keras.layers.SeparableConv2D(6, 3, depthwise_initializer="ones", pointwise_initializer="ones"),
    ),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_audit_spread_is_the_spread_of_the_bn_scales(kind):
    shape, make = LAYERS[kind]
    inputs = keras.Input(shape)
    bn = keras.layers.BatchNormalization()
    model = keras.Model(inputs, bn(make()(inputs)))
    # Six channels, scales γ/√(σ²+ε) spread 40× apart: a kernel of ones spreads exactly as much.
    gamma = np.array([1.0, 2.0, 0.5, 1.5, 20.0, 1.0], "float32")
    bn.gamma.assign(gamma)
    bn.moving_variance.assign(np.ones(6, "float32"))
    scales = gamma / np.sqrt(1.0 + bn.epsilon)

    audit = kerasbn.audit_quantization(model)

    (row,) = audit.layers
    assert row.channels == 6 and row.bn == bn.name
    assert row.weight == ("pointwise_kernel" if kind == "separable" else "kernel")
    assert row.ratio_before == 1.0
    assert row.ratio_after == pytest.approx(scales.max() / scales.min(), rel=1e-6)
    assert row.flagged and audit.flagged == [row]
    assert "per-channel" in str(audit)
    assert not kerasbn.audit_quantization(model, threshold=50.0).layers[0].flagged


def test_audit_sees_the_in_place_folds_of_a_subclassed_model():
    """Folded in place on a copy whose layers Keras renames (conv2d_1): the row is still found."""
    from tests.paths.models import IMAGE, ConvNet

    model = ConvNet()
    model(np.zeros((1, *IMAGE), "float32"))
    gamma = np.array([1.0, 2.0, 0.5, 20.0], "float32")
    model.bn.gamma.assign(gamma)
    scales = gamma / np.sqrt(1.0 + model.bn.epsilon)
    ranges = np.abs(np.asarray(model.conv.kernel)).reshape(-1, 4).max(axis=0)
    (row,) = kerasbn.audit_quantization(model).layers
    assert row.layer == model.conv.name and row.channels == 4
    assert row.ratio_after == pytest.approx((ranges * scales).max() / (ranges * scales).min(), rel=1e-5)


def test_audit_takes_a_fold_result_and_renders():
    model = randomize_bn(_dense_bn_model())
    result = kerasbn.fold(model)
    audit = kerasbn.audit_quantization(model, result)
    assert [w.layer for w in audit.layers] == [result.report.folded[0].partner]
    data = audit.to_dict()
    assert data["layers"][0]["levels_after"] == pytest.approx(127 / audit.layers[0].ratio_after)
    assert "| layer | BN |" in audit.to_markdown()
