"""QAT trains with fit (jit on, Keras's default), freezes, saves mid-training and continues identically."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

import kerasbn
from kerasbn.qat import layers

L = keras.layers


def digits(n: int = 512):
    data = load_digits()
    x = (data.images[:n] / 16.0).astype(np.float32)[..., None]
    return x, data.target[:n].astype(np.int32)


def depthwise_separable_net():
    x = keras.Input((8, 8, 1))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    h = L.ReLU()(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(h)))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(h)))
    return keras.Model(x, L.Dense(10)(L.Flatten()(L.MaxPooling2D()(h))))


def qat_model(**kwargs):
    keras.utils.set_random_seed(0)
    x, _ = digits()
    qat = kerasbn.qat.prepare(depthwise_separable_net(), calibration=x[:128], **kwargs)
    # XLA on TensorFlow too (Keras turns it off by default on a CPU-only machine, on by default on a GPU).
    qat.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True
    )
    return qat


def statistics(model):
    return [
        keras.ops.convert_to_numpy(v).copy() for f in layers.fused(model) for v in (f.moving_mean, f.moving_variance)
    ]


def test_loss_falls():
    """The QAT recipe: a briefly trained float model, prepared (calibrated) and fine-tuned."""
    keras.utils.set_random_seed(0)
    x, y = digits()
    model = depthwise_separable_net()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    qat = kerasbn.qat.prepare(model, calibration=x[:128])
    qat.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True
    )
    history = qat.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]


@pytest.mark.parametrize(
    "how",
    ["callback", pytest.param("argument", marks=pytest.mark.large), pytest.param("function", marks=pytest.mark.large)],
)
def test_frozen_statistics_stop_changing(how):
    qat = qat_model(freeze_after=2 if how == "argument" else None)
    x, y = digits(96)
    callbacks = [kerasbn.qat.FreezeBatchNorm(after_steps=2)] if how == "callback" else []
    before = statistics(qat)
    qat.fit(x[:64], y[:64], batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    moved = statistics(qat)
    assert all(not np.array_equal(a, b) for a, b in zip(before, moved))
    if how == "function":
        assert kerasbn.qat.freeze(qat) == 3
    kernel = keras.ops.convert_to_numpy(layers.fused(qat)[0].layer.kernel).copy()
    qat.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(moved, statistics(qat)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(kernel, keras.ops.convert_to_numpy(layers.fused(qat)[0].layer.kernel))


@pytest.mark.parametrize("how", ["argument", "function"])
def test_freezing_without_fit(how):
    """The cheap check of the other two ways to freeze: a training call no longer moves the statistics."""
    qat = qat_model(freeze_after=0 if how == "argument" else None)
    if how == "function":
        assert kerasbn.qat.freeze(qat) == 3
    x, _ = digits(32)
    before = statistics(qat)
    train = keras.ops.convert_to_numpy(qat(x, training=True))
    for a, b in zip(before, statistics(qat)):
        np.testing.assert_array_equal(a, b)
    # Frozen, a training step computes the deployed layers: only the activation ranges (moving
    # averages of the batch) can differ from inference.
    infer = keras.ops.convert_to_numpy(qat(x, training=False))
    assert np.abs(train - infer).max() <= 4 * max(
        float(keras.ops.convert_to_numpy(q.nudged_range()[2])) for q in layers.activation_quantizers(qat)
    )


def test_saved_mid_training_reloads_and_continues_identically(tmp_path):
    qat = qat_model(freeze_after=10)
    x, y = digits(256)
    qat.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)  # 8 steps: not frozen yet
    path = tmp_path / "mid.qat.keras"
    qat.save(path)
    again = keras.saving.load_model(path, safe_mode=True)  # with its optimizer state
    assert kerasbn.qat.is_qat(again)
    assert again.jit_compile and qat.jit_compile
    a = qat.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history["loss"]
    b = again.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history["loss"]
    assert a == b
    for v, w in zip(qat.weights, again.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), keras.ops.convert_to_numpy(w), err_msg=v.path)


@pytest.mark.large
def test_low_bit_qat_recovers_what_post_training_quantization_loses():
    """4-bit per-tensor weights on digits: QAT (BN folded, frozen for the last epochs) beats PTQ on held-out data."""
    keras.utils.set_random_seed(0)
    x, y = digits(1797)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1347], order[1347:]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = depthwise_separable_net()
    model.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
    model.fit(x[train], y[train], batch_size=32, epochs=15, verbose=0)
    # Population statistics before quantizing (the float model's own, as PTQ uses them).
    model = kerasbn.calibrate(model, x[train]).model
    model.compile(metrics=["accuracy"], loss=loss)
    float_acc = model.evaluate(x[test], y[test], verbose=0)[1]
    ptq = kerasbn.qat.prepare(model, weight_bits=4, per_channel=False, calibration=x[train][:256])
    ptq.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    ptq_acc = ptq.evaluate(x[test], y[test], verbose=0)[1]
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=10 * 43)
    ptq.compile(keras.optimizers.Adam(schedule), loss, metrics=["accuracy"])
    ptq.fit(x[train], y[train], batch_size=32, epochs=10, verbose=0, callbacks=[kerasbn.qat.FreezeBatchNorm(6 * 43)])
    qat_acc = ptq.evaluate(x[test], y[test], verbose=0)[1]
    print(f"digits, 4-bit per-tensor: float {float_acc:.3f}, PTQ {ptq_acc:.3f}, QAT {qat_acc:.3f}")
    assert qat_acc >= ptq_acc
    assert qat_acc >= float_acc - 0.03, (float_acc, ptq_acc, qat_acc)
