"""kerasbn.ops.fake_quant against float64 NumPy references of the grids (and TensorFlow's own FakeQuant)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasbn.ops import fake_quant as quantizers
from kerasbn.qat import layers


def weight_reference(w: np.ndarray, bits: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric narrow-range grid in float64: (q, scale), q = floor(w/scale + 0.5) clamped to ±(2^(b−1) − 1)."""
    n = 2 ** (bits - 1) - 1
    a = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0) if per_channel else np.abs(w).max()
    scale = np.asarray(a, np.float64) / n
    q = np.clip(np.floor(w / scale + 0.5), -n, n)
    return q, scale


def activation_reference(x: np.ndarray, lo: float, hi: float, bits: int = 8) -> np.ndarray:
    """TensorFlow's nudged asymmetric fake quant, written out in float64."""
    top = 2**bits - 1
    scale = (hi - lo) / top
    zero = np.clip(np.round(-lo / scale), 0, top)
    nlo, nhi = -zero * scale, (top - zero) * scale
    c = np.clip(x, nlo, nhi)
    return np.floor((c - nlo) / scale + 0.5) * scale + nlo


MODES = ["ops", "fake_quant", "qdq"] if keras.backend.backend() == "tensorflow" else ["ops"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_weight_grid_matches_reference(mode, bits, per_channel):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    q, scale = weight_reference(w.astype(np.float64), bits, per_channel)
    with quantizers.lowering(mode):
        got = np.asarray(keras.ops.convert_to_numpy(quantizers.fake_quant_weight(w, bits, per_channel)), np.float64)
    # The grid point itself, to float32 rounding of q·scale (and of the scale).
    np.testing.assert_allclose(got, q * scale, rtol=4 * 2.0**-24, atol=0)
    assert np.abs(np.rint(got / scale)).max() <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (0.0, 6.0), (0.3, 2.0), (-2.5, -0.5), (-0.123, 0.987)])
def test_activation_fake_quant_matches_reference(mode, lo, hi):
    x = np.random.default_rng(0).uniform(lo - 1, hi + 1, size=(4, 257)).astype(np.float32)
    want = activation_reference(x.astype(np.float64), lo, hi)
    with quantizers.lowering(mode):
        got = keras.ops.convert_to_numpy(quantizers.fake_quant_activation(x, np.float32(lo), np.float32(hi)))
    step = (hi - lo) / 255
    # Equal grid points; float32 rounding of the range may move a value sitting on a half-step by one step.
    off = np.abs(got - want)
    assert off.max() <= step * (1 + 1e-5)
    assert np.mean(off > 1e-5 * step + 1e-6) < 1e-2


def test_nudged_range_keeps_zero_exact():
    lo, hi, scale = (
        np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in quantizers.nudged_range(-0.123, 0.987)
    )
    zero = -lo / scale
    assert abs(zero - round(zero)) < 1e-4
    assert quantizers.zero_point(-0.123, 0.987) == round(zero)


def test_lowering_rejects_unknown_name():
    with pytest.raises(ValueError, match="Unknown lowering"):
        with quantizers.lowering("int4"):
            pass


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_weight_grid_of_a_depthwise_layer(per_channel):
    keras.utils.set_random_seed(3)
    layer = layers.QuantizedWeights(keras.layers.DepthwiseConv2D(3, depth_multiplier=2), per_channel=per_channel)
    layer(np.zeros((1, 5, 5, 3), np.float32))
    q, scale, axis = quantizers.weight_grid(layer)
    kernel = keras.ops.convert_to_numpy(layer.layer.kernel).astype(np.float64)
    flat = kernel.reshape(3, 3, 6)  # (*k, in·mult): channel c·mult + j
    want_q, want_scale = weight_reference(flat, 8, per_channel)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_allclose(scale, want_scale, rtol=2.0**-23)
    assert axis == (2 if per_channel else None)
