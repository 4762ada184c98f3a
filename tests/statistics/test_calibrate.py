"""`kerasbn.calibrate` against float64 NumPy references of Algorithm 2.

The references get each BN's inputs by an independent path: a sub-model
``keras.Model(model.inputs, bn.input)`` run through Keras's compiled predict
(sequential mode, one BN at a time, earlier BNs already set), Keras's own
training-mode call (paper mode), or plain NumPy algebra for BNs inside nested
models and custom layers.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.errors import KerasbnError
from kerasbn.folding import plan
from tests.helpers import outputs, randomize_bn

# The BN inputs of the two paths agree to float32 rounding (2⁻²⁴ ≈ 6e-8) a few
# layers deep; statistics reduce thousands of them in float64: 1e-6 relative.
RTOL = 1e-6
BATCH = 16


def conv_model(dropout: bool = True) -> keras.Model:
    """Conv → BN → ReLU → Conv → kerasbn BN (cumulative) → [Dropout] → Dense → BN, plus a BN on a side branch."""
    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 3, padding="same", name="conv2")(x)
    x = kerasbn.BatchNormalization(momentum=None, name="bn2")(x)
    side = keras.layers.BatchNormalization(name="bn_side")(keras.layers.GlobalAveragePooling2D()(x))
    if dropout:
        x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, name="dense")(x)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn3")(x)
    x = keras.layers.Concatenate()([x, side])
    return randomize_bn(keras.Model(inputs, x, name="conv_model"), seed=3)


def data(n: int = 70, shape=(6, 6, 3), seed: int = 0, offset: float = 100.0) -> np.ndarray:
    # An offset of 100: E[x²] − E[x]² in float32 would lose the variance; float64 does not.
    return (offset + np.random.default_rng(seed).normal(0.0, 2.0, (n, *shape))).astype("float32")


def bns(model: keras.Model) -> list:
    return [layer for layer in model.layers if plan.is_bn(layer)]


def algorithm2(chunks: list[np.ndarray], axis: int) -> tuple[np.ndarray, np.ndarray]:
    """E_B[μ_B] and m/(m−1)·E_B[σ²_B] over the given per-batch inputs, each batch weighted by its m."""
    means, variances, weights = [], [], []
    for x in chunks:
        x = np.asarray(x, np.float64)
        reduce = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
        m = x.size // x.shape[axis]
        means.append(x.mean(axis=reduce))
        variances.append(x.var(axis=reduce) * m / (m - 1))
        weights.append(m)
    w = np.array(weights, np.float64)[:, None]
    return (w * np.array(means)).sum(0) / w.sum(), (w * np.array(variances)).sum(0) / w.sum()


def clone(model: keras.Model) -> keras.Model:
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def by_hand_sequential(model: keras.Model, x: np.ndarray) -> keras.Model:
    """Each BN in graph order from a sub-model that ends at its input, earlier BNs already calibrated."""
    ref = clone(model)
    for bn in bns(ref):
        sub = keras.Model(ref.inputs, bn.input)
        chunks = [sub.predict_on_batch(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        mean, variance = algorithm2(chunks, bn.axis if isinstance(bn.axis, int) else bn.axis[0])
        bn.moving_mean.assign(mean.astype("float32"))
        bn.moving_variance.assign(variance.astype("float32"))
    return ref


def by_hand_paper(model: keras.Model, x: np.ndarray) -> dict[str, tuple]:
    """Every BN on its batch statistics: Keras's training-mode call of the sub-model up to each BN's input."""
    ref = clone(model)
    stats = {}
    for bn in bns(ref):
        sub = keras.Model(ref.inputs, bn.input)
        chunks = [np.asarray(sub(x[i : i + BATCH], training=True)) for i in range(0, len(x), BATCH)]
        stats[bn.name] = algorithm2(chunks, bn.axis if isinstance(bn.axis, int) else bn.axis[0])
    return stats


def assert_stats_close(layer, mean: np.ndarray, variance: np.ndarray, rtol: float = RTOL) -> None:
    got_mean = np.asarray(layer.moving_mean, np.float64)
    got_var = np.asarray(layer.moving_variance, np.float64)
    # Mean relative to its scale |E[x]| + σ (a mean of zero has no relative error of its own).
    np.testing.assert_array_less(np.abs(got_mean - mean), rtol * (np.abs(mean) + np.sqrt(variance)), layer.name)
    np.testing.assert_array_less(np.abs(got_var - variance), rtol * variance, layer.name)


def test_sequential_restores_corrupted_statistics_and_matches_a_model_calibrated_by_hand():
    model = conv_model()
    x = data()
    result = kerasbn.calibrate(model, x, batch_size=BATCH)
    ref = by_hand_sequential(model, x)
    for layer, expected in zip(bns(result.model), bns(ref)):
        assert_stats_close(layer, np.asarray(expected.moving_mean), np.asarray(expected.moving_variance))
    y, y_ref = outputs(result.model, x[:8]), outputs(ref, x[:8])
    scale = max(float(np.max(np.abs(a))) for a in y_ref)
    for a, b in zip(y, y_ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)
    assert result.report.passes == len(bns(model))
    # Keras's execution order: bn1 and bn2 first, then the two heads.
    assert [r.layer for r in result.report.batch_norms][:2] == ["bn1", "bn2"]
    assert {r.layer for r in result.report.batch_norms} == {"bn1", "bn2", "bn_side", "bn3"}


def test_paper_mode_uses_batch_statistics_for_every_bn():
    model = conv_model(dropout=False)
    # No large offset here: the reference normalizes in float32 (Keras's training call), whose
    # rounding of x − μ_B at an offset of 100 would alone shift later BNs' inputs by ~2e-6 σ.
    x = data(offset=1.0)
    result = kerasbn.calibrate(model, x, mode="paper", batch_size=BATCH)
    stats = by_hand_paper(model, x)
    # Keras's training call normalizes in float32: rsqrt(σ²+ε)·γ rounds by a few ulps, a
    # per-feature scale error of ~1e-7 that compounds over two BNs and a conv into the
    # later BNs' variances; calibrate normalizes in float64 (float64 reference below).
    for layer in bns(result.model):
        assert_stats_close(layer, *stats[layer.name], rtol=3e-6)
    assert result.report.passes == 1


def test_paper_mode_keeps_dropout_in_inference():
    model = conv_model(dropout=True)
    x = data(40)
    first = kerasbn.calibrate(model, x, mode="paper", batch_size=BATCH).model
    second = kerasbn.calibrate(model, x, mode="paper", batch_size=BATCH).model
    # With dropout active the two runs would draw different masks.
    for a, b in zip(bns(first), bns(second)):
        np.testing.assert_array_equal(np.asarray(a.moving_variance), np.asarray(b.moving_variance))


def test_input_model_is_not_modified():
    model = conv_model()
    before = [np.array(w) for w in model.get_weights()]
    kerasbn.calibrate(model, data(20), batch_size=BATCH)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all("call" not in vars(layer) for layer in bns(model))  # the hooks are gone


def test_settings_do_not_change_what_is_stored():
    """unbiased=False and any momentum: still m/(m−1)·E_B[σ²_B]."""
    inputs = keras.Input((4,))
    y = kerasbn.BatchNormalization(unbiased=False, momentum=0.1)(inputs)
    model = keras.Model(inputs, y)
    x = np.random.default_rng(1).normal(3.0, 2.0, (10, 4)).astype("float32")
    layer = bns(kerasbn.calibrate(model, x, batch_size=4).model)[0]
    mean, variance = algorithm2([x[:4], x[4:8], x[8:]], -1)
    assert_stats_close(layer, mean, variance)
    assert int(np.asarray(layer.moving_count if layer.moving_count is not None else [3])[0]) == 3


def test_cumulative_layer_gets_its_batch_count():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, kerasbn.BatchNormalization(momentum=None)(inputs))
    layer = bns(
        kerasbn.calibrate(model, np.ones((10, 4), "float32") + np.arange(40).reshape(10, 4), batch_size=4).model
    )[0]
    np.testing.assert_array_equal(np.asarray(layer.moving_count), [3, 3, 3, 3])


@keras.saving.register_keras_serializable(package="tests_statistics")
class DenseBN(keras.layers.Layer):
    """A custom layer holding a Dense and a BN as attributes (no functional graph inside)."""

    def __init__(self, units: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def nested_model() -> keras.Model:
    inner_in = keras.Input((5,))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization()(keras.layers.Dense(5)(inner_in)), name="inner")
    inputs = keras.Input((5,))
    x = DenseBN(4, name="block")(inner(inputs))
    x = keras.layers.BatchNormalization(name="last")(x)
    return randomize_bn(keras.Model(inputs, x), seed=5)


def _numpy_bn(x, layer, mean, variance):
    gamma = np.asarray(layer.gamma, np.float64)
    beta = np.asarray(layer.beta, np.float64)
    return (x - mean) / np.sqrt(variance + layer.epsilon) * gamma + beta


def _batches(h: np.ndarray) -> list[np.ndarray]:
    return [h[i : i + BATCH] for i in range(0, len(h), BATCH)]


def _dense(layer, h):
    """The Dense layer as the model computes it, in float32 (the statistics are then taken in float64)."""
    y = h.astype(np.float32) @ np.asarray(layer.kernel) + np.asarray(layer.bias)
    return y.astype(np.float64)


# Data near zero for the NumPy references below: they compute the network's Dense
# layers in float32 as the model does, but not Keras's float32 BN arithmetic, whose
# rounding at a large offset would alone differ by ~1e-6 σ (the offset case is the
# sub-model reference of the conv model above).


def test_paper_mode_in_nested_models_and_custom_layers_matches_float64_numpy():
    model = nested_model()
    x = (0.5 + np.random.default_rng(2).normal(size=(50, 5))).astype("float32")
    result = kerasbn.calibrate(model, x, mode="paper", batch_size=BATCH)
    inner, block, last = (result.model.get_layer(n) for n in ("inner", "block", "last"))
    bn_a = inner.layers[2]
    chunks = {"a": [], "b": [], "c": []}
    for xb in _batches(x.astype(np.float64)):
        h = _dense(inner.layers[1], xb)
        chunks["a"].append(h)
        h = _dense(block.dense, _numpy_bn(h, bn_a, h.mean(0), h.var(0)))
        chunks["b"].append(h)
        h = _numpy_bn(h, block.bn, h.mean(0), h.var(0))
        chunks["c"].append(h)
    for layer, key in ((bn_a, "a"), (block.bn, "b"), (last, "c")):
        assert_stats_close(layer, *algorithm2(chunks[key], -1))


def test_bns_in_nested_models_and_custom_layers_match_numpy():
    model = nested_model()
    x = (0.5 + np.random.default_rng(2).normal(size=(50, 5))).astype("float32")
    result = kerasbn.calibrate(model, x, batch_size=BATCH)
    inner = result.model.get_layer("inner")
    dense_a, bn_a = inner.layers[1], inner.layers[2]
    block = result.model.get_layer("block")
    last = result.model.get_layer("last")

    h = _dense(dense_a, x)
    chunks = [h[i : i + BATCH] for i in range(0, len(h), BATCH)]
    stats_a = algorithm2(chunks, -1)
    h = _dense(block.dense, _numpy_bn(h, bn_a, *stats_a))
    stats_b = algorithm2([h[i : i + BATCH] for i in range(0, len(h), BATCH)], -1)
    h = _numpy_bn(h, block.bn, *stats_b)
    stats_c = algorithm2([h[i : i + BATCH] for i in range(0, len(h), BATCH)], -1)
    for layer, stats in ((bn_a, stats_a), (block.bn, stats_b), (last, stats_c)):
        assert_stats_close(layer, *stats)
    paths = [r.path for r in result.report.batch_norms]
    assert paths[1].startswith("block/") and paths[0].startswith("inner/")


def test_multi_input_model_by_name():
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    y = keras.layers.BatchNormalization(name="bn")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, y)
    rng = np.random.default_rng(4)
    xa, xb = rng.normal(size=(10, 3)), rng.normal(size=(10, 2))
    layer = kerasbn.calibrate(model, {"b": xb, "a": xa}, batch_size=4).model.get_layer("bn")
    x = np.concatenate([xa, xb], 1).astype("float32")
    assert_stats_close(layer, *algorithm2([x[:4], x[4:8], x[8:]], -1))


def test_too_few_samples_for_an_unbiased_variance():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    with pytest.raises(KerasbnError, match="too few samples"):
        kerasbn.calibrate(model, np.ones((1, 3), "float32"))


def test_a_last_batch_of_one_sample_enters_the_mean_only():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    x = np.random.default_rng(6).normal(size=(5, 2)).astype("float32")
    layer = bns(kerasbn.calibrate(model, x, batch_size=4).model)[0]
    mean = (4 * x[:4].astype(np.float64).mean(0) + x[4]) / 5
    variance = x[:4].astype(np.float64).var(0) * 4 / 3
    assert_stats_close(layer, mean, variance)


def test_unknown_mode():
    with pytest.raises(KerasbnError, match="unknown calibration mode"):
        kerasbn.calibrate(conv_model(), data(4), mode="moving")


@pytest.mark.parametrize("mode", ["sequential", "paper"])
def test_a_pass_per_bn_logs_no_retracing_warning(mode):
    # One traced pass per BN is by design; TensorFlow's "retracing" warning (after five traces of one
    # function) would be noise on every calibration of a real network.
    import logging

    layers = [keras.Input((6,))]
    for _ in range(8):
        layers += [keras.layers.Dense(6), keras.layers.BatchNormalization()]
    model = randomize_bn(keras.Sequential(layers))
    data = np.random.default_rng(0).standard_normal((32, 6)).astype("float32")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        kerasbn.calibrate(model, data, mode=mode, batch_size=16)
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "retracing" in r.getMessage()]
