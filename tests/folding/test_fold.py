"""kerasbn.fold: every supported pair and layout against the unfolded model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.errors import UnsupportedModelError
from tests.helpers import (
    assert_matches_original,
    assert_same_outputs,
    count_bn,
    outputs,
    randomize_biases,
    randomize_bn,
)

L = keras.layers
CF = "channels_first"

# Shapes keep the channel count different from every spatial size: called
# eagerly on TF's CPU kernels, a channels_first Conv1D/Conv2D adds its bias
# along the wrong axis when the two coincide (a TensorFlow bug, not a fold
# problem; `kerasbn.verify` uses the compiled path, which is right).

# (id, input shape without batch, layer factory, BN axis)
BACKWARD = [
    ("dense", (5,), lambda: L.Dense(6), -1),
    ("dense_3d", (3, 5), lambda: L.Dense(6, use_bias=False), -1),
    ("conv1d", (9, 3), lambda: L.Conv1D(4, 3), -1),
    ("conv1d_cf", (3, 9), lambda: L.Conv1D(4, 3, data_format=CF), 1),
    ("conv2d", (7, 7, 3), lambda: L.Conv2D(4, 3, padding="same", use_bias=False), -1),
    ("conv2d_cf", (3, 7, 7), lambda: L.Conv2D(4, 3, data_format=CF), 1),
    ("conv2d_groups", (7, 7, 4), lambda: L.Conv2D(6, 3, groups=2), -1),
    ("conv2d_groups_cf", (4, 7, 7), lambda: L.Conv2D(6, 3, groups=2, data_format=CF), 1),
    ("conv2d_strided_same", (9, 9, 3), lambda: L.Conv2D(4, 3, strides=2, padding="same"), -1),
    ("conv2d_dilated", (9, 9, 3), lambda: L.Conv2D(4, 3, dilation_rate=2), -1),
    ("conv3d", (5, 5, 5, 2), lambda: L.Conv3D(3, 2), -1),
    ("conv3d_cf", (2, 5, 5, 5), lambda: L.Conv3D(3, 2, data_format=CF), 1),
    ("depthwise1d", (9, 3), lambda: L.DepthwiseConv1D(3, depth_multiplier=2), -1),
    ("depthwise1d_cf", (3, 9), lambda: L.DepthwiseConv1D(3, depth_multiplier=2, data_format=CF), 1),
    ("depthwise2d", (7, 7, 3), lambda: L.DepthwiseConv2D(3, use_bias=False), -1),
    ("depthwise2d_mult3", (7, 7, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=3), -1),
    ("depthwise2d_cf", (3, 7, 7), lambda: L.DepthwiseConv2D(3, depth_multiplier=2, data_format=CF), 1),
    ("separable1d", (9, 3), lambda: L.SeparableConv1D(4, 3, depth_multiplier=2), -1),
    ("separable2d", (7, 7, 3), lambda: L.SeparableConv2D(4, 3, use_bias=False), -1),
    ("separable2d_cf", (3, 7, 7), lambda: L.SeparableConv2D(4, 3, depth_multiplier=2, data_format=CF), 1),
    ("conv1d_transpose", (5, 3), lambda: L.Conv1DTranspose(4, 3, strides=2), -1),
    ("conv2d_transpose", (5, 5, 3), lambda: L.Conv2DTranspose(4, 3, strides=2, use_bias=False), -1),
    ("conv2d_transpose_cf", (3, 5, 5), lambda: L.Conv2DTranspose(4, 3, strides=2, data_format=CF), 1),
    ("conv3d_transpose", (3, 3, 3, 2), lambda: L.Conv3DTranspose(3, 2, strides=2), -1),
    # A layer applied at every step (video, sequences): the wrapped layer is the partner.
    ("time_distributed_dense", (3, 5), lambda: L.TimeDistributed(L.Dense(6)), -1),
    ("time_distributed_conv2d", (3, 7, 7, 2), lambda: L.TimeDistributed(L.Conv2D(4, 3, use_bias=False)), -1),
    ("time_distributed_conv2d_cf", (3, 2, 7, 7), lambda: L.TimeDistributed(L.Conv2D(4, 3, data_format=CF)), 2),
    ("time_distributed_depthwise", (3, 7, 7, 2), lambda: L.TimeDistributed(L.DepthwiseConv2D(3)), -1),
    ("time_distributed_conv1d_transpose", (3, 5, 2), lambda: L.TimeDistributed(L.Conv1DTranspose(4, 3)), -1),
]

FORWARD = [
    ("dense", (5,), lambda: L.Dense(6), -1),
    ("dense_relu_nobias", (5,), lambda: L.Dense(6, activation="relu", use_bias=False), -1),
    ("conv1d_valid", (9, 3), lambda: L.Conv1D(4, 3), -1),
    ("conv2d_valid", (7, 7, 3), lambda: L.Conv2D(4, 3, strides=2, use_bias=False), -1),
    ("conv2d_same_1x1", (7, 7, 3), lambda: L.Conv2D(4, 1, strides=2, padding="same"), -1),
    ("conv2d_valid_cf", (3, 7, 7), lambda: L.Conv2D(4, 3, data_format=CF), 1),
    ("conv2d_groups", (7, 7, 4), lambda: L.Conv2D(6, 3, groups=2), -1),
    ("conv3d_valid", (5, 5, 5, 2), lambda: L.Conv3D(3, 2), -1),
    ("depthwise2d_valid", (7, 7, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2), -1),
    ("separable2d_valid", (7, 7, 3), lambda: L.SeparableConv2D(4, 3, depth_multiplier=2), -1),
    ("dense_3d", (3, 5), lambda: L.Dense(4), -1),
    ("conv1d_causal_1", (9, 3), lambda: L.Conv1D(4, 1, padding="causal"), -1),
    ("conv2d_dilated_valid", (9, 9, 3), lambda: L.Conv2D(4, 3, dilation_rate=2), -1),
    ("conv3d_valid_cf", (2, 5, 5, 5), lambda: L.Conv3D(3, 2, data_format=CF), 1),
    ("depthwise1d_valid", (9, 3), lambda: L.DepthwiseConv1D(3, depth_multiplier=2, use_bias=False), -1),
    ("separable1d_valid", (9, 3), lambda: L.SeparableConv1D(4, 3), -1),
    ("time_distributed_dense", (3, 5), lambda: L.TimeDistributed(L.Dense(4, use_bias=False)), -1),
    ("time_distributed_conv2d_valid", (3, 7, 7, 2), lambda: L.TimeDistributed(L.Conv2D(4, 3)), -1),
]


def _model(shape, first, second):
    x = keras.Input(shape, name="x")
    return keras.Model(x, second(first(x)), name="pair")


def _check(model, folded_expected: int):
    randomize_bn(model)
    randomize_biases(model)
    result = kerasbn.fold(model)
    assert len(result.report.folded) == folded_expected, result.report
    assert count_bn(result.model) == count_bn(model) - folded_expected
    assert_same_outputs(model, result.model)
    return result


@pytest.mark.parametrize("shape,make,axis", [c[1:] for c in BACKWARD], ids=[c[0] for c in BACKWARD])
def test_backward_fold(shape, make, axis):
    result = _check(_model(shape, make(), L.BatchNormalization(axis=axis)), 1)
    (finding,) = result.report.folded
    assert finding.direction == "backward"


@pytest.mark.parametrize("shape,make,axis", [c[1:] for c in FORWARD], ids=[c[0] for c in FORWARD])
def test_forward_fold(shape, make, axis):
    result = _check(_model(shape, L.BatchNormalization(axis=axis), make()), 1)
    (finding,) = result.report.folded
    assert finding.direction == "forward"


@pytest.mark.parametrize("data_format,axis", [("channels_last", -1), ("channels_last", 1), (CF, 1)])
def test_forward_fold_through_flatten(data_format, axis):
    x = keras.Input((3, 4, 2) if data_format == "channels_last" else (2, 3, 4))
    h = L.BatchNormalization(axis=axis)(x)
    y = L.Dense(5)(L.Flatten(data_format=data_format)(h))
    result = _check(keras.Model(x, y), 1)
    assert result.report.folded[0].direction == "forward"


TD = L.TimeDistributed
TIME_DISTRIBUTED = {
    "backward_conv2d": ((3, 7, 7, 2), lambda x: L.BatchNormalization()(TD(L.Conv2D(4, 3), name="td")(x))),
    "backward_dense": ((4, 5), lambda x: L.BatchNormalization()(TD(L.Dense(3, use_bias=False), name="td")(x))),
    "forward_conv2d_valid": ((3, 7, 7, 2), lambda x: TD(L.Conv2D(4, 3), name="td")(L.BatchNormalization()(x))),
    "forward_dense": ((4, 5), lambda x: TD(L.Dense(3), name="td")(L.BatchNormalization()(x))),
}


@pytest.mark.parametrize("case", sorted(TIME_DISTRIBUTED))
def test_time_distributed_partner_folds_against_float64(case):
    shape, build = TIME_DISTRIBUTED[case]
    x = keras.Input(shape, name="frames")
    model = randomize_biases(randomize_bn(keras.Model(x, build(x))))
    result = kerasbn.fold(model)
    (finding,) = result.report.folded
    assert (finding.direction, finding.partner) == (case.split("_")[0], "td")
    assert count_bn(result.model) == 0
    data = np.random.default_rng(7).normal(size=(2, *shape)).astype("float32")
    assert_matches_original(model, outputs(result.model, data), data, "float32")


def test_bn_before_a_time_distributed_padded_conv_stays_saying_why():
    x = keras.Input((3, 7, 7, 2))
    model = keras.Model(x, TD(L.Conv2D(4, 3, padding="same"), name="td")(L.BatchNormalization()(x)))
    result = kerasbn.fold(randomize_bn(model))
    (finding,) = result.report.not_folded
    assert finding.code == "zero_padding" and "zero padding ('same') in 'td' (TimeDistributed)" in finding.reason


def test_a_time_distributed_bias_before_a_bn_is_redundant():
    x = keras.Input((3, 5))
    model = randomize_biases(keras.Model(x, L.BatchNormalization()(TD(L.Dense(4), name="td")(x))))
    result = kerasbn.strip_redundant_biases(randomize_bn(model))
    assert [b.layer for b in result.report.removed] == ["td"]
    assert not result.model.get_layer("td").layer.use_bias
    assert_same_outputs(model, result.model)


# BN variants that differ from a plain BN only in training: at inference each
# is the affine map of its moving statistics.
BN_VARIANTS = [
    ("keras_renorm", lambda axis: L.BatchNormalization(axis=axis, renorm=True)),
    ("keras_renorm_clipped", lambda axis: L.BatchNormalization(axis=axis, renorm=True, renorm_clipping={"rmax": 2.0})),
    ("kerasbn_renorm", lambda axis: kerasbn.BatchNormalization(axis=axis, renorm=True)),
    ("kerasbn_virtual_batch", lambda axis: kerasbn.BatchNormalization(axis=axis, virtual_batch_size=2)),
]
VARIANT_PAIRS = [
    ("backward", "conv2d", (7, 7, 3), lambda: L.Conv2D(4, 3), -1),
    ("backward", "dense_nobias", (5,), lambda: L.Dense(6, use_bias=False), -1),
    ("backward", "conv2d_cf", (3, 7, 7), lambda: L.Conv2D(4, 3, data_format=CF), 1),
    ("forward", "conv2d_valid", (7, 7, 3), lambda: L.Conv2D(4, 3), -1),
    ("forward", "dense", (5,), lambda: L.Dense(6), -1),
]


def _trained(model: keras.Model, shape, seed: int = 0) -> keras.Model:
    """``model`` after a few training steps, so renorm's own statistics move away from their initial values."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (8, *shape)).astype("float32")
    y = np.asarray(model(x))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, rng.normal(size=y.shape).astype("float32"), batch_size=4, epochs=3, verbose=0)
    return model


@pytest.mark.parametrize("variant", [v[1] for v in BN_VARIANTS], ids=[v[0] for v in BN_VARIANTS])
@pytest.mark.parametrize(
    "direction,shape,make,axis", [p[0:1] + p[2:] for p in VARIANT_PAIRS], ids=[f"{p[0]}-{p[1]}" for p in VARIANT_PAIRS]
)
def test_renorm_and_virtual_batch_fold(variant, direction, shape, make, axis):
    first, second = (make(), variant(axis)) if direction == "backward" else (variant(axis), make())
    model = randomize_biases(randomize_bn(_trained(_model(shape, first, second), shape)))
    result = kerasbn.fold(model)
    (finding,) = result.report.folded
    assert finding.direction == direction and not result.report.not_folded
    assert count_bn(result.model) == 0
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("variant", [v[1] for v in BN_VARIANTS], ids=[v[0] for v in BN_VARIANTS])
def test_renorm_and_virtual_batch_fold_in_place(variant):
    @keras.saving.register_keras_serializable(package="kbn_test_variant")
    class Block(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = L.Dense(4, name="dense")
            self.bn = variant(-1)

        def build(self, input_shape):
            self.dense.build(input_shape)
            self.bn.build((*input_shape[:-1], 4))

        def call(self, x):
            return keras.activations.relu(self.bn(self.dense(x)))

    x = keras.Input((5,))
    model = randomize_biases(randomize_bn(_trained(keras.Model(x, Block(name="block")(x)), (5,))))
    result = kerasbn.fold(model)
    (finding,) = result.report.folded
    assert finding.how == "in_place" and finding.direction == "backward"
    assert_same_outputs(model, result.model)
    bn = result.model.get_layer("block").bn
    # The identity BN's training statistics agree with it: σ = √(σ² + ε) = 1, mean 0.
    for name, value in (("moving_stddev", 1.0), ("renorm_mean", 0.0), ("renorm_stddev", 1.0)):
        if hasattr(bn, name):
            np.testing.assert_array_equal(np.asarray(getattr(bn, name)), value)


def test_kerasbn_layer_folds_and_original_is_untouched():
    x = keras.Input((6,))
    y = kerasbn.BatchNormalization(momentum=None, name="bn")(L.Dense(4, name="d")(x))
    model = randomize_biases(randomize_bn(keras.Model(x, y)))
    before = [w.numpy().copy() for w in model.weights]
    result = kerasbn.fold(model)
    assert_same_outputs(model, result.model)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
    # moving_count goes with the BN too.
    assert result.report.parameters_before - result.report.parameters_after == 4 * 5


def test_both_sides_into_one_layer():
    x = keras.Input((5,))
    h = L.BatchNormalization(name="bn_in")(x)
    h = L.BatchNormalization(name="bn_out")(L.Dense(4, name="d")(h))
    result = _check(keras.Model(x, L.ReLU()(h)), 2)
    assert {(f.layer, f.direction) for f in result.report.folded} == {("bn_in", "forward"), ("bn_out", "backward")}


def test_sequential_stays_sequential_and_keeps_names():
    model = keras.Sequential(
        [keras.Input((7, 7, 3)), L.Conv2D(4, 3, name="c"), L.BatchNormalization(name="bn"), L.ReLU(name="r")],
        name="seq",
    )
    result = _check(model, 1)
    assert isinstance(result.model, keras.Sequential)
    assert result.model.name == "seq"
    assert [layer.name for layer in result.model.layers] == ["c", "r"]


def test_bn_as_model_output_keeps_output_name():
    x = keras.Input((5,), name="x")
    y = L.BatchNormalization(name="out_bn")(L.Dense(3)(x))
    result = _check(keras.Model(x, y), 1)
    assert result.model.output_names == ["out_bn"]
    assert result.model.layers[-1].count_params() == 0


def test_nested_multi_input_multi_output(tmp_path):
    inner_in = keras.Input((6, 6, 3), name="inner_in")
    inner_out = L.BatchNormalization(name="inner_bn")(L.Conv2D(4, 3, name="inner_conv")(inner_in))
    inner = keras.Model(inner_in, inner_out, name="block")

    a = keras.Input((6, 6, 3), name="a")
    b = keras.Input((4,), name="b")
    h = inner(a)
    h = L.GlobalAveragePooling2D()(L.ReLU()(h))
    # A Dense inside the outer model followed by a BN across the boundary.
    tail_in = keras.Input((4,), name="tail_in")
    tail = keras.Model(tail_in, L.Dense(3, name="tail_dense")(tail_in), name="tail")
    y1 = L.BatchNormalization(name="bn_across")(tail(h))
    y2 = L.BatchNormalization(name="bn_b")(L.Dense(2, name="db")(b))
    model = keras.Model({"a": a, "b": b}, {"y1": y1, "y2": y2}, name="multi")
    result = _check(model, 3)
    folded = result.model
    assert sorted(t.name for t in folded.inputs) == ["a", "b"]
    assert folded.output_names == model.output_names
    assert {f.path for f in result.report.folded} == {"block/inner_bn", "bn_across", "bn_b"}
    assert isinstance(folded.get_layer("block"), keras.Model)
    path = tmp_path / "folded.keras"
    folded.save(path)
    reloaded = keras.saving.load_model(path)
    assert_same_outputs(model, reloaded)


def test_shared_nested_model_is_not_folded():
    inner_in = keras.Input((5,))
    inner = keras.Model(inner_in, L.BatchNormalization()(L.Dense(5)(inner_in)), name="shared_block")
    x = keras.Input((5,))
    model = keras.Model(x, inner(inner(x)))
    result = _check(model, 0)
    assert result.report.not_folded[0].code == "shared_bn"


def _mixed_model(policy: str, bn: type, in_place: bool) -> keras.Model:
    """Conv → BN → ReLU → Dense → BN → float32 output under ``policy``; the first pair inside a custom layer if ``in_place``."""

    @keras.saving.register_keras_serializable(package="kbn_test_mixed")
    class ConvBN(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = L.Conv2D(4, 3, name="conv", dtype=self.dtype_policy)
            self.bn = bn(name="bn", dtype=self.dtype_policy)

        def build(self, input_shape):
            self.conv.build(input_shape)
            self.bn.build((*input_shape[:-1], 4))

        def call(self, x):
            return self.bn(self.conv(x))

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        x = keras.Input((7, 7, 3))
        h = ConvBN(name="block")(x) if in_place else bn(name="bn")(L.Conv2D(4, 3, name="conv")(x))
        h = L.GlobalAveragePooling2D()(L.ReLU()(h))
        y = L.Activation("linear", dtype="float32", name="out")(bn(name="head_bn")(L.Dense(5, name="d")(h)))
        model = keras.Model(x, y)
    finally:
        keras.config.set_dtype_policy(previous)
    return randomize_biases(randomize_bn(model))


@pytest.mark.parametrize("in_place", [False, True], ids=["removed", "in_place"])
@pytest.mark.parametrize("bn", [L.BatchNormalization, kerasbn.BatchNormalization], ids=["keras", "kerasbn"])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fold_keeps_policies_and_passes_the_check(policy, bn, in_place):
    model = _mixed_model(policy, bn, in_place)
    result = kerasbn.fold(model)
    assert len(result.report.folded) == 2
    assert {f.how for f in result.report.folded} == ({"in_place", "removed"} if in_place else {"removed"})
    # An InputLayer computes nothing; its config holds only its tensor dtype.
    before, after = (
        {
            la.name: la.dtype_policy.name
            for la in m._flatten_layers(include_self=False)
            if not isinstance(la, L.InputLayer)
        }
        for m in (model, result.model)
    )
    assert after["d"] == policy and after["out"] == "float32"
    assert {path: name for path, name in after.items() if path in before} == {
        path: before[path] for path in after if path in before
    }
    partner = result.model.get_layer("block").conv if in_place else result.model.get_layer("conv")
    assert partner.dtype_policy.name == policy and partner.kernel.dtype == "float32"
    check = kerasbn.verify(model, result.model)
    assert check.passed and check.reference == "float64" and check.dtype == policy.removeprefix("mixed_"), check


def test_folded_model_still_trains():
    x = keras.Input((5,))
    model = keras.Model(x, L.Dense(1)(L.ReLU()(L.BatchNormalization()(L.Dense(4)(x)))))
    folded = _check(model, 1).model
    folded.compile(optimizer="sgd", loss="mse")
    history = folded.fit(np.ones((4, 5), "float32"), np.zeros((4, 1), "float32"), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_model_that_cannot_be_copied_is_a_one_line_error():
    class Scale(L.Layer):
        # `helper` is no config value, so Keras cannot write a config for it.
        def __init__(self, helper, **kwargs):
            super().__init__(**kwargs)
            self.helper = helper

        def call(self, x):
            return x * 2.0

    x = keras.Input((3,))
    model = keras.Model(x, Scale(object())(L.BatchNormalization()(L.Dense(3)(x))))
    with pytest.raises(UnsupportedModelError) as info:
        kerasbn.fold(model)
    assert "cannot be copied to fold it" in str(info.value)
    assert "\n" not in str(info.value)
