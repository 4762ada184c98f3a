"""kerasbn.folding.families: the fold arithmetic against direct float64 NumPy evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from kerasbn.folding import families
from kerasbn.folding.families import Conv as ConvFamily
from kerasbn.folding.families import ConvTranspose, Dense, DepthwiseConv, SeparableConv

rng = np.random.default_rng(0)


def _bn(n):
    weights = {
        "gamma": rng.uniform(0.5, 1.5, n),
        "beta": rng.normal(0, 0.2, n),
        "moving_mean": rng.normal(0, 0.5, n),
        "moving_variance": rng.uniform(0.5, 2, n),
    }
    return weights, families.bn_affine(weights, 1e-3)


def _bn_apply(weights, y, axis=-1):
    shape = [1] * y.ndim
    shape[axis] = -1

    def b(v):
        return np.reshape(v, shape)

    return (y - b(weights["moving_mean"])) / np.sqrt(b(weights["moving_variance"]) + 1e-3) * b(weights["gamma"]) + b(
        weights["beta"]
    )


def test_bn_affine_defaults_without_gamma_beta():
    s, t = families.bn_affine({"moving_mean": np.array([1.0]), "moving_variance": np.array([3.0])}, 1.0)
    assert s == pytest.approx([0.5]) and t == pytest.approx([-0.5])


def test_dense_backward_and_forward():
    x = rng.normal(size=(4, 5))
    w = {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)}
    bn, (s, t) = _bn(3)
    folded = Dense().backward(w, s, t)
    assert np.allclose(x @ folded["kernel"] + folded["bias"], _bn_apply(bn, x @ w["kernel"] + w["bias"]))
    bn, (s, t) = _bn(5)
    folded = Dense().forward(w, s, t)
    assert np.allclose(x @ folded["kernel"] + folded["bias"], _bn_apply(bn, x) @ w["kernel"] + w["bias"])


def _conv1x1(x, kernel, groups):
    """A 1×1 grouped convolution over the last axis of ``x`` (enough to check channel bookkeeping)."""
    cin, cout = x.shape[-1], kernel.shape[-1]
    ipg, opg = cin // groups, cout // groups
    out = np.zeros(x.shape[:-1] + (cout,))
    for g in range(groups):
        out[..., g * opg : (g + 1) * opg] = x[..., g * ipg : (g + 1) * ipg] @ kernel[0, 0, :, g * opg : (g + 1) * opg]
    return out


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_conv_forward_uses_each_group_channels(groups):
    x = rng.normal(size=(2, 6))
    w = {"kernel": rng.normal(size=(1, 1, 6 // groups, 3 * groups))}
    bn, (s, t) = _bn(6)
    folded = ConvFamily().forward(w, s, t)
    assert np.allclose(
        _conv1x1(x, folded["kernel"], groups) + folded["bias"], _conv1x1(_bn_apply(bn, x), w["kernel"], groups)
    )


def test_depthwise_backward_channel_order():
    # Output channel c·mult + j comes from input channel c and multiplier j.
    k = rng.normal(size=(3, 3, 2, 4))
    s = np.arange(1.0, 9.0)
    folded = DepthwiseConv().backward({"kernel": k}, s, np.zeros(8))
    assert np.allclose(folded["kernel"][..., 1, 2], k[..., 1, 2] * s[1 * 4 + 2])
    assert np.array_equal(folded["bias"], np.zeros(8))


def test_transpose_backward_scales_second_to_last_axis():
    k = rng.normal(size=(3, 3, 4, 2))
    s = np.arange(1.0, 5.0)
    folded = ConvTranspose().backward({"kernel": k}, s, np.ones(4))
    assert np.allclose(folded["kernel"], k * s[:, None])
    assert np.array_equal(folded["bias"], np.ones(4))


def test_separable_forward_shift_passes_through_pointwise():
    dw = rng.normal(size=(1, 1, 2, 3))
    pw = rng.normal(size=(1, 1, 6, 4))
    x = rng.normal(size=(5, 2))
    bn, (s, t) = _bn(2)

    def run(d, p, b, inp):
        inner = (inp[:, :, None] * d[0, 0]).reshape(5, 6)
        return inner @ p[0, 0] + b

    folded = SeparableConv().forward({"depthwise_kernel": dw, "pointwise_kernel": pw}, s, t)
    assert np.allclose(
        run(folded["depthwise_kernel"], folded["pointwise_kernel"], folded["bias"], x),
        run(dw, pw, 0.0, _bn_apply(bn, x)),
    )


def test_transpose_has_no_forward_fold():
    assert not ConvTranspose().forward_foldable
    with pytest.raises(ValueError, match="No exact forward fold"):
        ConvTranspose().forward({"kernel": np.ones((1, 1, 1, 1))}, np.ones(1), np.ones(1))


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_registry_finds_each_family_and_subclasses(family):
    for cls in family.layers:
        assert families.family_of(object.__new__(cls)) is family
        subclass = type(f"My{cls.__name__}", (cls,), {})
        assert families.family_of(object.__new__(subclass)) is family


def test_registry_ignores_other_layers():
    import keras

    assert families.family_of(keras.layers.ReLU()) is None
    assert families.family_of(keras.layers.BatchNormalization()) is None


@pytest.mark.parametrize("channels_first", [False, True])
def test_tile_for_flatten(channels_first):
    shape = (2, 3, 4)  # features after the batch axis; channel axis 1 (size 2)
    v = np.array([10.0, 20.0])
    x = np.broadcast_to(v.reshape(2, 1, 1), shape)
    expected = np.moveaxis(x, 0, -1).reshape(-1) if channels_first else x.reshape(-1)
    assert np.array_equal(families.tile_for_flatten(v, shape, 1, channels_first), expected)


def test_bias_into_mean():
    w = {"moving_mean": np.array([1.0, 2.0]), "moving_variance": np.ones(2)}
    out = families.bias_into_mean(w, np.array([0.5, -1.0]))
    assert np.array_equal(out["moving_mean"], [0.5, 3.0])
    assert out["moving_variance"] is w["moving_variance"]
