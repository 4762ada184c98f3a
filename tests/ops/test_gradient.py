"""The layer's hand-written gradient against the paper's, in float64.

kerasbn replaces autodiff with the closed form (kerasbn.ops.normalize) and,
on TensorFlow outside XLA, with TF's fused gradient kernel fed the layer's own
statistics. Every execution mode must give the paper's gradients: checked
against `tests.reference.backward` (float64) and against central finite
differences of a float64 layer.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from tests import reference
from tests.conftest import BACKEND, MODES, in_mode, tensor, torch_gradients

CASES = [((16, 6, 5, 4), -1), ((12, 4, 5, 3), 1), ((64, 10), -1), ((6, 7, 5), [1, 2])]
CASE_IDS = ["nhwc", "nchw", "dense", "two-feature-axes"]


def layer_gradients(layer, x, dy, mode, mask=None):
    """(dL/dx, {weight name: dL/dw}) of L = Σ y·dy in training mode, computed in ``mode``."""
    if not layer.built:
        layer.build(x.shape)
    weights = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def grad(t, g):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = layer(t, training=True, mask=mask)
            return tape.gradient(y, [t] + [w.value for w in weights], output_gradients=tf.cast(g, y.dtype))

        if mode != "eager":
            grad = tf.function(grad, jit_compile=(mode == "xla"))
        out = grad(tf.constant(x), tf.constant(dy))
    elif BACKEND == "torch":
        fn = in_mode(lambda t, m: layer(t, training=True, mask=m), mode)
        out = torch_gradients(lambda t: fn(t, tensor(mask)), x, weights, dy)
    else:
        import jax
        import jax.numpy as jnp

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(t, trainable):
            y, _ = layer.stateless_call(trainable, non_trainable, t, training=True, mask=mask)
            return jnp.sum(y * jnp.asarray(dy))

        grad = jax.grad(loss, argnums=(0, 1))
        if mode == "jit":
            grad = jax.jit(grad)
        gx, gw = grad(jnp.asarray(x), [w.value for w in weights])
        out = [gx] + list(gw)
    out = [np.asarray(keras.ops.convert_to_numpy(o), np.float64) for o in out]
    return out[0], {w.name: g for w, g in zip(weights, out[1:], strict=True)}


def random_affine(layer, rng):
    layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape).astype(layer.gamma.dtype))
    layer.beta.assign(rng.normal(size=layer.beta.shape).astype(layer.beta.dtype))
    return np.asarray(layer.gamma, np.float64)


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_gradient_matches_the_paper(shape, axis, mode, offset, rng):
    layer = kerasbn.BatchNormalization(axis=axis)
    layer.build(shape)
    gamma = random_affine(layer, rng)
    x = (rng.normal(0.5, 2.0, shape) + offset).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    dx, dgamma, dbeta = reference.backward(x, dy, axis, gamma=gamma, eps=layer.epsilon)
    gx, gw = layer_gradients(layer, x, dy, mode)
    gg, gb = gw["gamma"], gw["beta"]
    np.testing.assert_allclose(gx, dx, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(gg, dgamma.reshape(gg.shape), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(gb, dbeta.reshape(gb.shape), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_of_a_large_batch_with_a_large_offset(mode, rng):
    """m = 25088 per feature at an offset of 1e5: the regime of the numerical contract."""
    shape = (32, 28, 28, 4)
    layer = kerasbn.BatchNormalization()
    layer.build(shape)
    gamma = random_affine(layer, rng)
    x = (rng.normal(size=shape) + 1e5).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    dx, dgamma, dbeta = reference.backward(x, dy, -1, gamma=gamma, eps=layer.epsilon)
    gx, gw = layer_gradients(layer, x, dy, mode)
    gg, gb = gw["gamma"], gw["beta"]
    np.testing.assert_allclose(gx, dx, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(gg, dgamma.ravel(), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(gb, dbeta.ravel(), rtol=1e-4, atol=1e-2)


def representable(a, dtype):
    """``a`` in float32 with every value exactly representable in ``dtype``."""
    a = np.asarray(a, np.float32)
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    return (a.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_gradient(mode, dtype, rng):
    """Mixed precision: half-precision data and gradients, float32 statistics and sums.

    m = 3136 per feature takes XLA:CPU's blocked gradient sums, and on
    TensorFlow outside XLA the fused kernels fed half-precision data; the data
    sit at an offset of 100 (bfloat16's spacing there is 0.5).
    """
    shape = (16, 14, 14, 8)
    layer = kerasbn.BatchNormalization(dtype=f"mixed_{dtype}")
    layer.build(shape)
    gamma = random_affine(layer, rng)
    x = representable(rng.normal(0.5, 2.0, shape) + 100.0, dtype)
    dy = representable(rng.normal(size=shape), dtype)
    dx, dgamma, dbeta = reference.backward(x, dy, -1, gamma=gamma, eps=layer.epsilon)
    gx, gw = layer_gradients(layer, x, dy, mode)
    # ∂/∂x comes back in half precision (8 or 11 significant bits); the weights' sums in float32.
    np.testing.assert_allclose(gx, dx, rtol=1e-2, atol=1e-2 * np.abs(dx).max())
    np.testing.assert_allclose(gw["gamma"], dgamma.ravel(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gw["beta"], dbeta.ravel(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_virtual_batch_gradient_is_per_group(mode, rng):
    shape, v = (12, 5, 3), 4
    layer = kerasbn.BatchNormalization(virtual_batch_size=v)
    layer.build(shape)
    gamma = random_affine(layer, rng)
    x = rng.normal(3.0, 2.0, shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    parts = [
        reference.backward(x[i : i + v], dy[i : i + v], -1, gamma=gamma, eps=layer.epsilon) for i in range(0, 12, v)
    ]
    gx, gw = layer_gradients(layer, x, dy, mode)
    gg, gb = gw["gamma"], gw["beta"]
    np.testing.assert_allclose(gx, np.concatenate([p[0] for p in parts]), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(gg, sum(p[1] for p in parts).ravel(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(gb, sum(p[2] for p in parts).ravel(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_gradient_without_center_or_scale(center, scale, mode, rng):
    shape = (16, 4, 4, 3)
    layer = kerasbn.BatchNormalization(center=center, scale=scale)
    layer.build(shape)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    dx, dgamma, dbeta = reference.backward(x, dy, -1, eps=layer.epsilon)
    gx, gw = layer_gradients(layer, x, dy, mode)
    np.testing.assert_allclose(gx, dx, atol=2e-5, rtol=1e-4)
    expected = ({"gamma": dgamma.ravel()} if scale else {}) | ({"beta": dbeta.ravel()} if center else {})
    assert sorted(gw) == sorted(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(gw[name], want, atol=1e-4, rtol=1e-5)


# Keras on JAX computes a float64 layer partly in float32 unless JAX's
# float64 mode is on for the whole process, which would change every other
# test: the finite differences run on TensorFlow, where float64 is exact.
@pytest.mark.skipif(BACKEND != "tensorflow", reason="needs float64 throughout: JAX only with jax_enable_x64")
@pytest.mark.parametrize("kwargs", [{}, {"virtual_batch_size": 3}, {"mask": True}], ids=["plain", "virtual", "mask"])
def test_gradient_matches_finite_differences(kwargs, rng):
    """Central differences of a float64 layer (closed form; autodiff for masks).

    Renorm is left out on purpose: its corrections r and d are constants to
    the gradient by definition (Ioffe, 2017), so it is not the derivative.
    """
    kwargs = dict(kwargs)
    use_mask = kwargs.pop("mask", False)
    shape = (6, 3, 2)
    layer = kerasbn.BatchNormalization(dtype="float64", **kwargs)
    layer.build(shape)
    random_affine(layer, rng)
    x = rng.normal(1.0, 2.0, shape)
    dy = rng.normal(size=shape)
    mask = (rng.uniform(size=shape[:-1]) > 0.3) if use_mask else None
    if mask is not None:
        mask[0, 0] = True
    weights = layer.trainable_variables
    values = [np.asarray(w, np.float64) for w in weights]

    def loss(xv, wv):
        for w, v in zip(weights, wv, strict=True):
            w.assign(v)
        state = [np.asarray(v) for v in layer.non_trainable_variables]
        y = np.asarray(layer(xv, training=True, mask=mask), np.float64)
        for v, s in zip(layer.non_trainable_variables, state, strict=True):
            v.assign(s)
        return float(np.sum(y * dy))

    gx, gw = layer_gradients(layer, x, dy, "eager", mask=mask)
    grads = [gx] + [gw[w.name] for w in weights]
    h = 1e-6
    for index in [(0, 0, 0), (3, 1, 1), (5, 2, 0)]:
        xp, xm = x.copy(), x.copy()
        xp[index] += h
        xm[index] -= h
        numeric = (loss(xp, values) - loss(xm, values)) / (2 * h)
        assert abs(grads[0][index] - numeric) <= 1e-6 * max(1.0, abs(numeric))
    for k in range(len(values)):
        vp, vm = [u.copy() for u in values], [u.copy() for u in values]
        vp[k][1] += h
        vm[k][1] -= h
        numeric = (loss(x, vp) - loss(x, vm)) / (2 * h)
        assert abs(grads[1 + k][1] - numeric) <= 1e-6 * max(1.0, abs(numeric))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's fused kernels")
def test_tensorflow_picks_the_fused_kernel_outside_xla_only():
    import tensorflow as tf

    shape = (8, 4, 4, 3)
    layer = kerasbn.BatchNormalization()
    layer.build(shape)

    def step(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = layer(t, training=True)
        return tape.gradient(y, t), layer(t, training=False)

    spec = tf.TensorSpec(shape, "float32")
    graph = tf.function(step).get_concrete_function(spec).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("FusedBatchNormGradV3") == 1
    assert types.count("FusedBatchNormV3") == 2  # training forward and inference, one kernel each
    hlo = tf.function(step, jit_compile=True).experimental_get_compiler_ir(tf.zeros(shape))(stage="hlo")
    assert "batch-norm" not in hlo  # XLA expands its own BN ops into slow generic code
