"""kerasbn.BatchNormalization against the float64 reference of the paper."""

from __future__ import annotations

import doctest
import inspect
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.layers import batch_normalization as bn_module
from tests import reference
from tests.conftest import BACKEND, MODES, gradients, run

# (input shape, axis): ranks 2–5, last / first-feature / several axes.
CASES = [
    ((16, 5), -1),
    ((8, 6, 4), -1),
    ((8, 4, 6), 1),
    ((4, 5, 5, 3), -1),
    ((4, 3, 5, 5), 1),
    ((4, 5, 5, 3), [2, 3]),
    ((2, 3, 4, 4, 3), -1),
    ((2, 3, 4, 4, 3), 1),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CASES]
TOLERANCE = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


def feature_shape(shape, axis):
    return tuple(shape[a % len(shape)] for a in sorted({a % len(shape) for a in np.atleast_1d(axis)}))


def randomize(layer, rng):
    """Non-trivial γ, β and moving statistics, as a trained layer has."""
    shape = layer.moving_mean.shape
    if layer.scale:
        layer.gamma.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
    if layer.center:
        layer.beta.assign(rng.normal(0, 0.2, shape).astype("float32"))
    layer.moving_mean.assign(rng.normal(0, 0.5, shape).astype("float32"))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))


def weights(layer):
    gamma = np.asarray(layer.gamma, np.float64) if layer.scale else None
    beta = np.asarray(layer.beta, np.float64) if layer.center else None
    return gamma, beta


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_training_output_is_algorithm1(shape, axis, mode, dtype, rng):
    layer = kerasbn.BatchNormalization(axis=axis, dtype=keras.DTypePolicy(dtype))
    layer.build(shape)
    randomize(layer, rng)
    x = keras.ops.convert_to_numpy(keras.ops.cast(rng.normal(1.0, 2.0, shape), dtype))
    y = run(layer, x, training=True, mode=mode)
    assert str(y.dtype) == dtype
    gamma, beta = weights(layer)
    expected, *_ = reference.algorithm1(x.astype(np.float64), axis, gamma, beta, eps=layer.epsilon)
    np.testing.assert_allclose(y.astype(np.float64), expected, atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_training_without_center_or_scale(center, scale, rng):
    shape, axis = (8, 4, 6), 1
    layer = kerasbn.BatchNormalization(axis=axis, center=center, scale=scale)
    layer.build(shape)
    randomize(layer, rng)
    x = rng.normal(size=shape).astype("float32")
    gamma, beta = weights(layer)
    expected, *_ = reference.algorithm1(x, axis, gamma, beta, eps=layer.epsilon)
    np.testing.assert_allclose(run(layer, x, training=True, mode=MODES[-1]), expected, atol=1e-5)
    assert len(layer.trainable_weights) == int(center) + int(scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_inference_is_algorithm2(shape, axis, mode, rng):
    layer = kerasbn.BatchNormalization(axis=axis, epsilon=1e-2)
    layer.build(shape)
    randomize(layer, rng)
    x = rng.normal(0.5, 2.0, shape).astype("float32")
    gamma, beta = weights(layer)
    expected = reference.algorithm2(
        x, axis, np.asarray(layer.moving_mean), np.asarray(layer.moving_variance), gamma, beta, eps=1e-2
    )
    np.testing.assert_allclose(run(layer, x, training=False, mode=mode), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_inference_is_algorithm2(mode, dtype, rng):
    """Mixed precision at an offset of 100: half-precision data in and out, float32 statistics."""
    shape = (16, 6, 6, 8)
    layer = kerasbn.BatchNormalization(dtype=f"mixed_{dtype}")
    layer.build(shape)
    randomize(layer, rng)
    layer.moving_mean.assign(rng.normal(100.0, 1.0, 8).astype("float32"))
    layer.moving_variance.assign(rng.uniform(2.0, 6.0, 8).astype("float32"))
    x = keras.ops.convert_to_numpy(keras.ops.cast(rng.normal(100.5, 2.0, shape), dtype))
    y = run(layer, x, training=False, mode=mode)
    assert str(y.dtype) == dtype
    gamma, beta = weights(layer)
    mean, var = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
    expected = reference.algorithm2(x.astype(np.float64), -1, mean, var, gamma, beta, eps=layer.epsilon)
    np.testing.assert_allclose(y.astype(np.float64), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("momentum", [0.9, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("mode", MODES)
def test_moving_statistics_follow_algorithm2(momentum, unbiased, mode, rng):
    shape, axis = (6, 3, 3, 4), -1
    layer = kerasbn.BatchNormalization(axis=axis, momentum=momentum, unbiased=unbiased)
    layer.build(shape)
    mean, var = np.zeros(4), np.ones(4)
    for step in range(4):
        x = rng.normal(step, 1.0 + step, shape).astype("float32")
        run(layer, x, training=True, mode=mode)
        _, mu, sigma2, m = reference.algorithm1(x, axis, eps=layer.epsilon)
        mean, var = reference.moving_update(mean, var, mu.ravel(), sigma2.ravel(), m.ravel(), momentum, unbiased, step)
        np.testing.assert_allclose(np.asarray(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(layer.moving_variance), var, rtol=1e-5, atol=1e-6)
    if momentum is None:
        np.testing.assert_array_equal(np.asarray(layer.moving_count), np.full(4, 4.0))


def test_cumulative_average_is_the_population_statistic(rng):
    """After k equal-sized batches, E_B[μ_B] is the mean of all the data."""
    layer = kerasbn.BatchNormalization(momentum=None)
    batches = [rng.normal(3.0, 2.0, (32, 5)).astype("float32") for _ in range(5)]
    for x in batches:
        run(layer, x, training=True, mode=MODES[-1])
    data = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), data.mean(0), rtol=1e-5)
    expected = np.mean([x.astype(np.float64).var(0, ddof=1) for x in batches], axis=0)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), expected, rtol=1e-5)


# Compiled by torch, both layers on seven shapes take half a minute: test-large (test_renorm_matches_keras_when_biased
# and the algorithm tests compile in make test).
@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.large) if m == "compile" else m for m in MODES])
@pytest.mark.parametrize("shape,axis", [(s, a) for s, a in CASES if isinstance(a, int)])
def test_biased_matches_keras(shape, axis, mode, rng):
    """unbiased=False reproduces keras.layers.BatchNormalization step by step."""
    ours = kerasbn.BatchNormalization(axis=axis, momentum=0.8, unbiased=False)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.8)
    ours.build(shape)
    theirs.build(shape)
    randomize(ours, rng)
    theirs.set_weights(ours.get_weights())
    for step in range(3):
        x = rng.normal(step, 2.0, shape).astype("float32")
        np.testing.assert_allclose(
            run(ours, x, training=True, mode=mode), run(theirs, x, training=True, mode=mode), atol=2e-5
        )
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        run(ours, x, training=False, mode=mode), run(theirs, x, training=False, mode=mode), atol=1e-5
    )


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_mask_excludes_positions_from_statistics(unbiased, mode, rng):
    shape = (4, 7, 3)
    x = rng.normal(size=shape).astype("float32")
    mask = rng.uniform(size=shape[:-1]) > 0.4
    x[~mask] = 1e3  # padding far from the data must not leak into the statistics
    layer = kerasbn.BatchNormalization(momentum=0.5, unbiased=unbiased)
    y = run(layer, x, training=True, mode=mode, mask=mask)
    expected, mu, var, m = reference.algorithm1(x, -1, eps=layer.epsilon, mask=mask)
    np.testing.assert_allclose(y[mask], expected[mask], atol=1e-5)
    mean, variance = reference.moving_update(0.0, 1.0, mu.ravel(), var.ravel(), m.ravel(), 0.5, unbiased)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), variance, rtol=1e-5)


def test_mask_matches_keras_when_biased(rng):
    shape = (4, 7, 3)
    x = rng.normal(size=shape).astype("float32")
    mask = rng.uniform(size=shape[:-1]) > 0.4
    ours, theirs = kerasbn.BatchNormalization(unbiased=False), keras.layers.BatchNormalization()
    np.testing.assert_allclose(
        run(ours, x, training=True, mode="eager", mask=mask),
        run(theirs, x, training=True, mode="eager", mask=mask),
        atol=1e-4,
    )
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mask_of_wrong_rank_is_refused():
    with pytest.raises(ValueError, match="one dimension less"):
        kerasbn.BatchNormalization()(np.ones((2, 3, 4), "float32"), training=True, mask=np.ones((2, 3, 4), bool))


@pytest.mark.parametrize("mode", MODES)
def test_renorm_matches_keras_when_biased(mode, rng):
    shape = (8, 5)
    kwargs = dict(
        renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, renorm_momentum=0.7, momentum=0.8
    )
    ours = kerasbn.BatchNormalization(unbiased=False, **kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    theirs.set_weights(ours.get_weights())
    for step in range(3):
        x = rng.normal(step, 1.0 + step, shape).astype("float32")
        np.testing.assert_allclose(
            run(ours, x, training=True, mode=mode), run(theirs, x, training=True, mode=mode), atol=2e-5
        )
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_renorm_unbiased_tracks_the_sample_stddev(rng):
    layer = kerasbn.BatchNormalization(renorm=True, momentum=0.0, epsilon=0.0)
    x = rng.normal(2.0, 3.0, (5, 4)).astype("float32")
    run(layer, x, training=True, mode="eager")
    np.testing.assert_allclose(np.asarray(layer.moving_variance), x.astype(np.float64).var(0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.9, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("mode", MODES)
def test_virtual_batches_normalize_each_group(momentum, mode, rng):
    shape, v = (12, 3, 4), 4
    layer = kerasbn.BatchNormalization(virtual_batch_size=v, momentum=momentum)
    layer.build(shape)
    randomize(layer, rng)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    old_mean, old_var = np.asarray(layer.moving_mean, np.float64), np.asarray(layer.moving_variance, np.float64)
    y = run(layer, x, training=True, mode=mode)
    gamma, beta = weights(layer)
    groups = [reference.algorithm1(g, -1, gamma, beta, eps=layer.epsilon) for g in np.split(x, shape[0] // v)]
    np.testing.assert_allclose(y, np.concatenate([g[0] for g in groups]), atol=1e-5)
    mu = np.mean([g[1].ravel() for g in groups], axis=0)
    var = np.mean([g[2].ravel() * g[3].ravel() / (g[3].ravel() - 1) for g in groups], axis=0)
    mean, variance = reference.moving_update(old_mean, old_var, mu, var, None, momentum, unbiased=False)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), variance, rtol=1e-5, atol=1e-6)


def test_virtual_batch_size_must_divide_the_batch():
    with pytest.raises(ValueError, match="not a multiple"):
        kerasbn.BatchNormalization(virtual_batch_size=4)(np.ones((6, 3), "float32"), training=True)


@pytest.mark.parametrize("shape,axis", [CASES[0], CASES[2], CASES[5]], ids=[CASE_IDS[0], CASE_IDS[2], CASE_IDS[5]])
def test_gradients_are_the_papers(shape, axis, rng):
    layer = kerasbn.BatchNormalization(axis=axis)
    layer.build(shape)
    randomize(layer, rng)
    x = rng.normal(2.0, 1.5, shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    gamma, _ = weights(layer)
    dx, dgamma, dbeta = reference.backward(x, dy, axis, gamma=gamma, eps=layer.epsilon)
    gx, gw = gradients(layer, x, dy)
    np.testing.assert_allclose(gx, dx, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(gw["gamma"], dgamma.reshape(gw["gamma"].shape), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(gw["beta"], dbeta.reshape(gw["beta"].shape), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, 1e5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(64, 16, 16, 8), (512, 32)], ids=["conv", "dense"])
def test_large_offset_stays_exact(shape, mode, offset, rng):
    """max|y − y_ref| ≤ 1e-5 against Algorithm 1 in float64 on the same float32 input."""
    x = (rng.normal(size=shape) + offset).astype("float32")
    layer = kerasbn.BatchNormalization(momentum=0.0)
    y = run(layer, x, training=True, mode=mode)
    expected, mu, var, m = reference.algorithm1(x, -1, eps=layer.epsilon)
    assert np.abs(y - expected).max() <= 1e-5
    # Inference with the statistics just stored stays exact too.
    stored = reference.algorithm2(
        x, -1, np.asarray(layer.moving_mean), np.asarray(layer.moving_variance), eps=layer.epsilon
    )
    assert np.abs(run(layer, x, training=False, mode=mode) - stored).max() <= 1e-5
    np.testing.assert_allclose(np.asarray(layer.moving_variance), (var * m / (m - 1)).ravel(), rtol=1e-5)


def test_float16_near_overflow_keeps_float32_statistics(rng):
    """Squares of ~4e4 overflow float16; the statistics must not."""
    x = (4e4 * rng.uniform(-1, 1, (16, 6))).astype("float16")
    layer = kerasbn.BatchNormalization(dtype="float16")
    y = run(layer, x, training=True, mode=MODES[-1])
    assert y.dtype == np.float16 and np.isfinite(y).all()
    expected, *_ = reference.algorithm1(x.astype(np.float64), -1, eps=layer.epsilon)
    np.testing.assert_allclose(y.astype(np.float64), expected, atol=4e-3 * 4, rtol=4e-3)
    assert np.isfinite(np.asarray(layer.moving_variance)).all()
    assert layer.moving_variance.dtype == "float32"


def test_mixed_precision_policy_keeps_float32_weights(rng):
    layer = kerasbn.BatchNormalization(dtype="mixed_float16")
    x = rng.normal(size=(8, 3)).astype("float16")
    y = run(layer, x, training=True, mode=MODES[-1])
    assert y.dtype == np.float16
    assert {w.dtype for w in layer.weights} == {"float32"}


def test_single_value_per_feature_is_refused_when_known():
    with pytest.raises(ValueError, match="more than one value per feature"):
        kerasbn.BatchNormalization()(np.ones((1, 4), "float32"), training=True)


@pytest.mark.parametrize("mode", MODES)
def test_single_value_at_run_time_keeps_moving_statistics(mode, rng):
    """A feature with m = 1 (here: all but one position masked) never gets a NaN variance."""
    layer = kerasbn.BatchNormalization(momentum=0.5)
    x = rng.normal(size=(3, 4, 2)).astype("float32")
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    y = run(layer, x, training=True, mode=mode, mask=mask)
    np.testing.assert_array_equal(np.asarray(layer.moving_mean), np.zeros(2))
    np.testing.assert_array_equal(np.asarray(layer.moving_variance), np.ones(2))
    np.testing.assert_allclose(y[mask], np.zeros((1, 2)), atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="a batch size unknown when traced exists on TensorFlow only")
def test_single_value_batch_in_a_traced_function_keeps_moving_statistics():
    import tensorflow as tf

    layer = kerasbn.BatchNormalization(momentum=0.5)
    layer.build((None, 3))
    step = tf.function(lambda t: layer(t, training=True), input_signature=[tf.TensorSpec((None, 3))])
    y = step(tf.ones((1, 3)) * 7.0).numpy()
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(np.asarray(layer.moving_variance), np.ones(3))
    step(tf.constant([[1.0, 2, 3], [3, 4, 5]]))
    np.testing.assert_allclose(np.asarray(layer.moving_variance), np.full(3, 0.5 + 0.5 * 2.0))


def test_trainable_false_means_inference(rng):
    layer = kerasbn.BatchNormalization()
    layer.build((8, 3))
    randomize(layer, rng)
    layer.trainable = False
    before = [w.copy() for w in layer.get_weights()]
    x = rng.normal(size=(8, 3)).astype("float32")
    np.testing.assert_allclose(run(layer, x, training=True, mode="eager"), run(layer, x, training=False, mode="eager"))
    for a, b in zip(before, layer.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def small_model():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = kerasbn.BatchNormalization(momentum=None, name="bn_conv")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16)(x)
    x = kerasbn.BatchNormalization(axis=[-1], virtual_batch_size=4, name="bn_dense")(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def test_fit_with_xla_lowers_the_loss(rng):
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(64, 6, 6, 2)).astype("float32")
    y = np.stack([x.mean((1, 2, 3)), x[:, :3].std((1, 2, 3)), x[:, 1, :, 0].max(1)], -1).astype("float32")
    model = small_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=True)
    history = model.fit(x, y, batch_size=16, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.3 * history.history["loss"][0]


@pytest.mark.parametrize("load_backend", ["tensorflow", "jax", "torch"])
def test_saved_model_reloads_with_only_import_kerasbn(load_backend, tmp_path, rng):
    """Saved on the active backend, loaded on each backend in a fresh process.

    The BN weights come back bit for bit; the outputs agree to float32
    rounding (1e-6) on the same backend and to the float32 tolerance of the
    peers' convolutions (1e-5 of max|y|) on another one.
    """
    model = small_model()
    x = rng.normal(size=(8, 6, 6, 2)).astype("float32")
    model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(model(x, training=False)))
    for name in ("bn_conv", "bn_dense"):
        for w in model.get_layer(name).weights:
            np.save(tmp_path / f"{name}-{w.name}.npy", keras.ops.convert_to_numpy(w))
    rtol = 1e-6 if load_backend == BACKEND else 1e-5
    script = (
        "import sys, numpy as np, keras, kerasbn\n"
        f"assert keras.backend.backend() == {load_backend!r}\n"
        f"m = keras.saving.load_model({str(path)!r})\n"
        f"y = keras.ops.convert_to_numpy(m(np.load({str(tmp_path / 'x.npy')!r}), training=False))\n"
        f"want = np.load({str(tmp_path / 'y.npy')!r})\n"
        f"assert np.abs(y - want).max() <= {rtol} * np.abs(want).max(), np.abs(y - want).max()\n"
        "for name in ('bn_conv', 'bn_dense'):\n"
        "    for w in m.get_layer(name).weights:\n"
        f"        saved = np.load({str(tmp_path)!r} + f'/{{name}}-{{w.name}}.npy')\n"
        "        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), saved)\n"
        "bn = m.get_layer('bn_dense')\n"
        "assert type(bn) is kerasbn.BatchNormalization and bn.virtual_batch_size == 4 and bn.axis == [-1]\n"
        "assert m.get_layer('bn_conv').momentum is None\n"
    )
    env = {**os.environ, "KERAS_BACKEND": load_backend}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_config_round_trip():
    layer = kerasbn.BatchNormalization(
        axis=[1, 3],
        momentum=None,
        epsilon=1e-4,
        center=False,
        unbiased=False,
        virtual_batch_size=8,
        gamma_initializer="random_uniform",
        gamma_regularizer="l2",
        synchronized=True,
        name="bn",
    )
    clone = kerasbn.BatchNormalization.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert keras.saving.get_registered_name(kerasbn.BatchNormalization) == "kerasbn>BatchNormalization"


def test_constructor_is_a_superset_of_keras():
    ours = inspect.signature(kerasbn.BatchNormalization).parameters
    for name, parameter in inspect.signature(keras.layers.BatchNormalization).parameters.items():
        assert name in ours
        assert ours[name].default == parameter.default, name
    assert {"unbiased", "virtual_batch_size"} <= set(ours)


def test_weight_names_match_keras():
    layer = kerasbn.BatchNormalization()
    layer.build((2, 3))
    assert [w.name for w in layer.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(momentum=1.5), "momentum"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(virtual_batch_size=0), "virtual_batch_size"),
        (dict(renorm=True, momentum=None), "renorm"),
        (dict(renorm=True, renorm_clipping={"rmax": 1, "rmin": 2}), "rmax"),
        (dict(renorm=True, renorm_clipping={"bad": 1}), "invalid keys"),
        (dict(axis=[]), "axis"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kerasbn.BatchNormalization(**kwargs)


@pytest.mark.parametrize(
    "kwargs,shape,message",
    [
        (dict(axis=3), (2, 3), "out of bounds"),
        (dict(axis=[1, -1]), (2, 3), "same axis twice"),
        (dict(axis=0, virtual_batch_size=2), (4, 3), "batch axis"),
    ],
)
def test_invalid_shapes_are_refused(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        kerasbn.BatchNormalization(**kwargs).build(shape)


def test_docstring_example_runs():
    failures, tried = doctest.testmod(bn_module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert tried > 0 and failures == 0


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is the torch backend's compiler")
@pytest.mark.parametrize(
    "shape,axis,virtual_batch_size",
    [((8, 6, 6, 4), -1, None), ((8, 4, 6, 6), 1, None), ((300, 5), -1, None), ((8, 6, 6, 4), -1, 4)],
    ids=["nhwc", "nchw", "dense", "ghost"],
)
def test_training_call_compiles_into_one_torch_graph(shape, axis, virtual_batch_size):
    """A graph break splits Keras's compiled torch step and runs the layer's pieces eagerly between graphs:
    a generator expression in a shape computation once cost seven (torch.compile step 0.68 → 0.26–0.41 ×
    Keras's on 32×56×56×64 without them)."""
    import torch

    layer = kerasbn.BatchNormalization(axis=axis, virtual_batch_size=virtual_batch_size)
    layer.build(shape)
    x = torch.as_tensor(np.random.default_rng(0).normal(size=shape).astype("float32"))
    explained = torch._dynamo.explain(lambda t: layer(t, training=True))(x)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
