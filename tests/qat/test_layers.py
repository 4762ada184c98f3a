"""The fused linear+BN layers against a float64 NumPy reference of the fold and the fake quant (Jacob et al. 2018, 3.2)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasbn.ops import fake_quant as quantizers
from kerasbn.qat import layers
from tests.helpers import outputs
from tests.ops.test_fake_quant import weight_reference

L = keras.layers
CF = "channels_first"
U = 2.0**-24  # float32 unit roundoff

# (id, input shape without batch, linear layer, per_channel)
CASES = [
    ("dense", (5,), lambda: L.Dense(6), False),
    ("conv1d_dilated", (9, 3), lambda: L.Conv1D(4, 3, dilation_rate=2), True),
    ("conv2d_same", (7, 7, 3), lambda: L.Conv2D(4, 3, padding="same", use_bias=False), True),
    ("conv2d_groups", (7, 7, 4), lambda: L.Conv2D(6, 3, groups=2), True),
    ("conv1d_causal", (9, 3), lambda: L.Conv1D(4, 3, padding="causal"), True),
    ("depthwise2d_mult2", (7, 7, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2), True),
    ("depthwise2d_per_tensor", (7, 7, 3), lambda: L.DepthwiseConv2D(3), False),
]


def fused_layer(make, shape, per_channel, seed=0):
    keras.utils.set_random_seed(seed)
    linear = make()
    fused = layers.fused_class(linear)(linear, epsilon=1e-3, momentum=0.9, per_channel=per_channel)
    fused.build((None, *shape))
    rng = np.random.default_rng(seed)
    n = fused.gamma.shape[0]
    fused.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
    fused.beta.assign(rng.normal(0, 0.2, n).astype("float32"))
    fused.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
    fused.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    if linear.use_bias:
        linear.bias.assign(rng.normal(0, 0.3, n).astype("float32"))
    return fused


def numpy_fold(fused):
    """(quantized folded kernel, folded bias, s) in float64 from the paper's formulas."""
    w = lambda v: keras.ops.convert_to_numpy(v).astype(np.float64)  # noqa: E731
    s = w(fused.gamma) / np.sqrt(w(fused.moving_variance) + fused.epsilon)
    kernel = w(fused.layer.kernel)
    b = w(fused.layer.bias) if fused.layer.use_bias else 0.0
    if isinstance(fused, layers.DepthwiseConvBatchNorm):
        folded = (kernel * s.reshape(kernel.shape[-2:])).reshape(*kernel.shape[:-2], -1)
    else:
        folded = kernel * s
    q, scale = weight_reference(folded, 8, fused.per_channel)
    return (q * scale).reshape(kernel.shape), (b - w(fused.moving_mean)) * s + w(fused.beta), s


def run64(linear, shape, kernel, bias, x):
    config = {**linear.get_config(), "dtype": "float64", "use_bias": bias is not None, "name": "twin"}
    twin = type(linear).from_config(config)
    inp = keras.Input(shape, dtype="float64")
    model = keras.Model(inp, twin(inp))
    twin.kernel.assign(kernel)
    if bias is not None:
        twin.bias.assign(bias)
    return np.asarray(keras.ops.convert_to_numpy(model.predict(x, verbose=0)), np.float64)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_inference_is_the_folded_quantized_layer(case):
    _, shape, make, per_channel = case
    fused = fused_layer(make, shape, per_channel)
    x = np.random.default_rng(1).normal(size=(4, *shape))
    inp = keras.Input(shape)
    got = outputs(keras.Model(inp, fused(inp)), x.astype(np.float32))[0]
    kernel, bias, _ = numpy_fold(fused)
    x32 = x.astype(np.float32).astype(np.float64)
    want = run64(fused.layer, shape, kernel, bias, x32)
    # Float32 accumulation: each output sums |x|·|w| over the kernel's taps.
    mass = run64(fused.layer, shape, np.abs(kernel), None, np.abs(x32))
    taps = kernel.size // max(bias.size, 1)
    bound = (taps + 4) * U * (mass + np.abs(bias).max())
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))
    q, scale, _ = quantizers.weight_grid(fused)
    np.testing.assert_allclose(q * scale.astype(np.float64), kernel.reshape(q.shape), rtol=4 * U)


@pytest.mark.parametrize("case", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_training_step_corrects_to_batch_statistics(case):
    """Training output = BN with batch statistics of conv(x, fq(W·s))/s + b; moving statistics move by the momentum."""
    _, shape, make, per_channel = case
    fused = fused_layer(make, shape, per_channel)
    x = np.random.default_rng(2).normal(size=(8, *shape)).astype(np.float32)
    mean0 = keras.ops.convert_to_numpy(fused.moving_mean).astype(np.float64)
    var0 = keras.ops.convert_to_numpy(fused.moving_variance).astype(np.float64)
    kernel, _, s = numpy_fold(fused)
    got = keras.ops.convert_to_numpy(fused(x, training=True)).astype(np.float64)
    b = keras.ops.convert_to_numpy(fused.layer.bias).astype(np.float64) if fused.layer.use_bias else 0.0
    y = run64(fused.layer, shape, kernel, None, x.astype(np.float64))
    axis = 1 if getattr(fused.layer, "data_format", "channels_last") == CF and y.ndim > 2 else y.ndim - 1
    view = [1] * y.ndim
    view[axis] = -1
    z = y / s.reshape(view) + (np.reshape(b, view) if np.ndim(b) else b)
    axes = tuple(a for a in range(y.ndim) if a != axis)
    mu, var = z.mean(axis=axes), z.var(axis=axes)
    gamma = keras.ops.convert_to_numpy(fused.gamma).astype(np.float64)
    beta = keras.ops.convert_to_numpy(fused.beta).astype(np.float64)
    want = (z - mu.reshape(view)) * (gamma / np.sqrt(var + fused.epsilon)).reshape(view) + beta.reshape(view)
    # Normalized outputs are O(1); the float32 path loses a few hundred roundoffs through conv, /s and the moments.
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(fused.moving_mean), 0.9 * mean0 + 0.1 * mu, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(fused.moving_variance), 0.9 * var0 + 0.1 * var, rtol=1e-4, atol=1e-5
    )


def test_frozen_layer_trains_as_it_infers_and_keeps_its_statistics():
    fused = fused_layer(CASES[2][2], CASES[2][1], True)
    x = np.random.default_rng(3).normal(size=(4, 7, 7, 3)).astype(np.float32)
    fused.freeze_at.assign(0)
    mean0 = keras.ops.convert_to_numpy(fused.moving_mean).copy()
    train = keras.ops.convert_to_numpy(fused(x, training=True))
    infer = keras.ops.convert_to_numpy(fused(x, training=False))
    np.testing.assert_array_equal(train, infer)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fused.moving_mean), mean0)


@pytest.mark.parametrize(
    "layer",
    [
        layers.ActivationQuantizer(bits=8, momentum=0.9, name="q"),
        layers.QuantizedWeights(L.SeparableConv2D(4, 3), weight_bits=4, per_channel=False, name="w"),
        layers.ConvBatchNorm(L.Conv2D(4, 3), epsilon=1e-2, momentum=0.8, unbiased=True, freeze_at=5, name="f"),
    ],
    ids=["activation", "separable_weights", "conv_bn"],
)
def test_config_round_trip(layer):
    config = keras.saving.serialize_keras_object(layer)
    again = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert type(again) is type(layer)
    assert again.get_config() == layer.get_config()


def test_dense_is_per_tensor():
    layer = layers.QuantizedWeights(L.Dense(3), per_channel=True)
    assert layer.per_channel is False
