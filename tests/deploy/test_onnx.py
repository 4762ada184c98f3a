"""`kerasbn.export` to ONNX: plain Keras layers, grouped convolutions, keras-hub activations and backbones
export with no BatchNormalization arithmetic and no stand-alone bias op left, and ONNX Runtime agrees
with Keras at two batch sizes."""

from __future__ import annotations

import math

import keras
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kerasbn
import kerasbn.deploy.onnx_passes as onnx_passes
from kerasbn.deploy.export import _passes
from kerasbn.deploy.onnx import TARGET, op_counts, to_onnx
from kerasbn.errors import KerasbnError, VerificationError
from tests.helpers import assert_matches_original, file_outputs

# What a BN leaves in an ONNX graph when it is not folded, and what a bias is when a Conv/Gemm does not carry it.
ARITHMETIC = {"BatchNormalization", "Mul", "Add", "Sub", "Div", "Sqrt", "Reciprocal"}
EPS32 = float(np.finfo(np.float32).eps)


def _randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """Non-trivial BN statistics and biases, so a leftover Mul/Add cannot be optimized away as identity."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "use_bias", False) and not isinstance(layer, keras.layers.BatchNormalization):
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape).astype("float32"))
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = (w.shape for w in layer.weights)
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma).astype("float32"),
                    rng.normal(0, 0.5, beta).astype("float32"),
                    rng.normal(0, 0.5, mean).astype("float32"),
                    rng.uniform(0.5, 2.0, variance).astype("float32"),
                ]
            )
    return model


def _model(shape, layers) -> keras.Model:
    inputs = keras.Input(shape, name="x")
    y = inputs
    for make in layers:
        y = make()(y)
    return _randomize(keras.Model(inputs, y))


def _bn_arithmetic(proto) -> list[str]:
    """Arithmetic nodes tf2onnx named after a BatchNormalization (its ``batchnorm/`` scope)."""
    return [n.name for n in proto.graph.node if n.op_type in ARITHMETIC and "batchnorm" in n.name.lower()]


def _attribute(node, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


L = keras.layers
BN = L.BatchNormalization
# Every partner carries a random bias: after the fold it is the BN's shift too, and must end up in the op.
CASES = {
    "dense_bn": ((5,), [lambda: L.Dense(4), BN]),
    "conv1d_bn": ((10, 3), [lambda: L.Conv1D(4, 3), BN]),
    "conv2dtranspose_bn": ((5, 5, 3), [lambda: L.Conv2DTranspose(4, 3), BN]),
    "conv3dtranspose_bn": ((4, 4, 4, 2), [lambda: L.Conv3DTranspose(3, 2), BN]),
    "depthwise_multiplier2_bn": ((6, 6, 3), [lambda: L.DepthwiseConv2D(3, depth_multiplier=2), BN]),
    "separableconv1d_bn": ((10, 3), [lambda: L.SeparableConv1D(4, 3), BN]),
    "grouped_conv2d_groups2_bn": ((6, 6, 4), [lambda: L.Conv2D(6, 3, groups=2), BN]),
    # keras-hub's depthwise convolutions: a Conv2D with groups = channels.
    "grouped_conv2d_depthwise_bn": ((6, 6, 4), [lambda: L.Conv2D(4, 3, groups=4), BN]),
    # A 4×4 output with 4 filters: there Keras 3.15's eager channels_first Conv2D on CPU adds
    # its bias along the wrong axis; the export compares with Keras's compiled predict path.
    "conv2d_channels_first_bn": ((3, 6, 6), [lambda: L.Conv2D(4, 3, data_format="channels_first"), lambda: BN(axis=1)]),
    "bn_conv2d_valid": ((6, 6, 3), [BN, lambda: L.Conv2D(4, 3, padding="valid")]),
    "bn_dense": ((5,), [BN, lambda: L.Dense(4)]),
    "bn_flatten_dense": ((3, 3, 2), [BN, L.Flatten, lambda: L.Dense(4)]),
    "conv2d_bn": ((6, 6, 3), [lambda: L.Conv2D(4, 3), BN]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_leaves_no_bn_or_bias_arithmetic(case, tmp_path):
    model = _model(*CASES[case])
    path = tmp_path / f"{case}.onnx"

    result = kerasbn.export_onnx(model, path, compare_unfolded=True)

    assert result.verified
    assert [c.batch_size for c in result.checks] == [1, 8]
    written = onnx.load(str(path))
    ops = op_counts(written)
    assert ops == result.op_counts
    # No layer here computes anything but its Conv/ConvTranspose/Gemm: any arithmetic left is a BN's or a bias.
    assert not ARITHMETIC & set(ops), ops
    assert "StatefulPartitionedCall" not in ops
    onnx.checker.check_model(written)
    assert result.size == path.stat().st_size and result.size_unfolded > 0
    assert result.op_counts_unfolded is not None  # the "before fold" column of the table


# The partners of a BN that the fold engine folds in place inside a custom layer.
IN_PLACE = {
    "conv1d": ((10, 3), lambda: L.Conv1D(4, 3, use_bias=False)),
    "dense": ((5,), lambda: L.Dense(4, use_bias=False)),
    "grouped_conv2d_depthwise": ((6, 6, 4), lambda: L.Conv2D(4, 3, groups=4, use_bias=False)),
    "conv3dtranspose": ((4, 4, 4, 2), lambda: L.Conv3DTranspose(3, 2, use_bias=False)),
}


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1e-3, 1.001e-5])
@pytest.mark.parametrize("partner", sorted(IN_PLACE))
def test_a_bn_folded_in_place_leaves_no_arithmetic(partner, epsilon, tmp_path):
    """γ = 1, μ = 0, σ² = 1 − ε is the identity scale; β carries the partner's new bias."""
    shape, make = IN_PLACE[partner]
    inputs = keras.Input(shape, name="x")
    bn = BN(epsilon=epsilon)
    model = keras.Model(inputs, L.ReLU()(bn(make()(inputs))))
    channels = bn.gamma.shape
    beta = np.random.default_rng(6).normal(0, 0.5, channels)
    bn.set_weights([np.ones(channels), beta, np.zeros(channels), np.full(channels, 1 - epsilon)])

    result = kerasbn.export_onnx(model, tmp_path / "m.onnx", fold=False)

    assert result.verified
    ops = op_counts(onnx.load(str(tmp_path / "m.onnx")))
    assert not ARITHMETIC & set(ops), ops


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_convolution_is_one_onnx_conv_with_its_group(groups, tmp_path):
    # Keras runs these through an XLA-compiled function on CPU, which tf2onnx cannot convert.
    model = _model((6, 6, 4), [lambda: L.Conv2D(8, 3, groups=groups)])
    result = kerasbn.export_onnx(model, tmp_path / "m.onnx", fold=False)
    assert result.verified
    convs = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Conv"]
    assert [_attribute(n, "group") for n in convs] == [groups]


def test_a_per_sample_map_exports_as_batched_ops_with_a_dynamic_batch(tmp_path):
    # keras.ops.map traces to a while loop; D-FINE gathers its top-k queries per sample this way.
    x = keras.Input((6, 3), name="x")
    scores = L.Dense(1, name="score")(x)[..., 0]
    picked = keras.ops.top_k(scores, 4)[1]
    gathered = keras.ops.map(lambda pair: keras.ops.take(pair[0], pair[1], axis=0), (x, picked))
    model = keras.Model(x, {"gathered": gathered, "scores": scores})
    data = np.random.default_rng(4).standard_normal((5, 6, 3)).astype("float32")
    result = kerasbn.export_onnx(model, tmp_path / "map.onnx", fold=False, inputs=data)
    assert result.verified and "Loop" not in result.op_counts and "TopK" in result.op_counts
    from kerasbn.deploy.runtime import onnx_runner

    run = onnx_runner(tmp_path / "map.onnx")
    for batch in (1, 5):
        got, got_scores = run([data[:batch]])
        # The rows the file's own scores select, picked in NumPy: a copy, so exactly equal.
        order = np.argsort(-got_scores, axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(got, np.take_along_axis(data[:batch], order[..., None], axis=1))


def test_exact_gelu_matches_a_float64_reference(tmp_path):
    # Keras's exact GELU is 0.5·x·erfc(−x/√2): ONNX has no Erfc.
    model = _model((64,), [lambda: L.Activation(keras.activations.gelu)])
    x = np.linspace(-8, 8, 2 * 64, dtype="float32").reshape(2, 64)
    result = kerasbn.export_onnx(model, tmp_path / "gelu.onnx", fold=False, inputs=x)
    assert result.verified and "Erf" in result.op_counts
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "gelu.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    exact = np.vectorize(lambda v: 0.5 * v * math.erfc(-v / math.sqrt(2)))(x.astype("float64"))
    # float32 rounding of erf near ±1 (the 1 − erf cancellation), then of the product.
    np.testing.assert_allclose(got, exact, rtol=0, atol=4 * EPS32 * np.abs(exact).max())


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["gelu_exact", "hard_swish", "hard_sigmoid", "silu"])
def test_keras_hub_activations_export_after_a_folded_dense(activation, tmp_path):
    kind = keras.activations.gelu if activation == "gelu_exact" else activation
    model = _model((5,), [lambda: L.Dense(4, use_bias=False), BN, lambda: L.Activation(kind)])
    x = np.random.default_rng(5).normal(0, 3, (6, 5)).astype("float32")  # reaches the activations' tails
    result = kerasbn.export_onnx(model, tmp_path / "m.onnx", inputs=x)
    assert result.verified
    written = onnx.load(str(tmp_path / "m.onnx"))
    ops = op_counts(written)
    assert ops.get("Gemm") == 1 and "MatMul" not in ops and "BatchNormalization" not in ops, ops
    assert _bn_arithmetic(written) == []


def _trained_like(model: keras.Model, seed: int = 0) -> keras.Model:
    """BN statistics and biases as a trained network has them: variance and γ 0.8–1.25, mean and β ±0.1."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        name = w.path.rsplit("/", 1)[-1]
        if name in ("moving_variance", "gamma"):
            w.assign(rng.uniform(0.8, 1.25, w.shape).astype(w.dtype))
        elif name in ("moving_mean", "beta", "bias"):
            w.assign(rng.uniform(-0.1, 0.1, w.shape).astype(w.dtype))
    return model


# Small configurations from keras-hub 0.32's own backbone tests.
KERAS_HUB = {
    "mobilenet_v3": (
        "MobileNetBackbone",
        {
            "stackwise_expansion": [[40, 56], [64, 144, 144], [72, 72], [144, 288, 288]],
            "stackwise_num_blocks": [2, 3, 2, 3],
            "stackwise_num_filters": [[16, 16], [24, 24, 24], [24, 24], [48, 48, 48]],
            "stackwise_kernel_size": [[3, 3], [5, 5, 5], [5, 5], [5, 5, 5]],
            "stackwise_num_strides": [[2, 1], [2, 1, 1], [1, 1], [2, 1, 1]],
            "stackwise_se_ratio": [[None, None], [0.25, 0.25, 0.25], [0.25, 0.25], [0.25, 0.25, 0.25]],
            "stackwise_activation": [
                ["relu", "relu"],
                ["hard_swish"] * 3,
                ["hard_swish"] * 2,
                ["hard_swish"] * 3,
                ["hard_swish"],
            ],
            "stackwise_padding": [[1, 1], [2, 2, 2], [2, 2], [2, 2, 2]],
            "output_num_filters": 1024,
            "input_activation": "hard_swish",
            "output_activation": "hard_swish",
            "input_num_filters": 16,
            "image_shape": (32, 32, 3),
            "depthwise_filters": 8,
            "depthwise_stride": 2,
            "depthwise_residual": False,
            "squeeze_and_excite": 0.5,
            "last_layer_filter": 288,
        },
    ),
    # Exact GELU (Erfc in TensorFlow) between BN layers; keras-hub's test config, BN instead of RMS norm.
    "mobilenet_v5_gelu": (
        "MobileNetV5Backbone",
        {
            "stackwise_block_types": [["er"], ["uir", "uir"]],
            "stackwise_num_blocks": [1, 2],
            "stackwise_num_filters": [[24], [48, 48]],
            "stackwise_strides": [[2], [2, 1]],
            "stackwise_act_layers": [["gelu"], ["gelu", "gelu"]],
            "stackwise_exp_ratios": [[4.0], [6.0, 6.0]],
            "stackwise_se_ratios": [[0.0], [0.0, 0.0]],
            "stackwise_dw_kernel_sizes": [[0], [5, 5]],
            "stackwise_dw_start_kernel_sizes": [[0], [0, 0]],
            "stackwise_dw_end_kernel_sizes": [[0], [0, 0]],
            "stackwise_exp_kernel_sizes": [[3], [0, 0]],
            "stackwise_pw_kernel_sizes": [[1], [0, 0]],
            "stackwise_num_heads": [[0], [0, 0]],
            "stackwise_key_dims": [[0], [0, 0]],
            "stackwise_value_dims": [[0], [0, 0]],
            "stackwise_kv_strides": [[0], [0, 0]],
            "stackwise_use_cpe": [[False], [False, False]],
            "image_shape": (32, 32, 3),
            "stem_size": 16,
            "use_msfa": False,
            "norm_layer": "batch_norm",
        },
    ),
    "hgnetv2_light_blocks": (
        "HGNetV2Backbone",
        {
            "embedding_size": 32,
            "stem_channels": [3, 16, 32],
            "hidden_act": "relu",
            "use_learnable_affine_block": False,
            "num_channels": 3,
            "image_shape": (64, 64, 3),
            "depths": [1, 1],
            "hidden_sizes": [64, 128],
            "stackwise_stage_filters": [[32, 16, 64, 1, 1, 3], [64, 32, 128, 1, 1, 3]],
            "apply_downsample": [True, True],
            "use_lightweight_conv_block": [True, True],
            "out_features": ["stem", "stage1", "stage2"],
        },
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(KERAS_HUB))
def test_keras_hub_backbone_exports_and_matches(backbone, tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    name, config = KERAS_HUB[backbone]
    model = _trained_like(getattr(keras_hub.models, name)(**config))
    x = np.random.default_rng(1).uniform(0, 1, (4, *config["image_shape"])).astype("float32")
    scale = max(float(np.abs(y).max()) for y in keras.tree.flatten(model.predict_on_batch(x)))

    # Checked at batch 4 and 1 on x: max |ONNX Runtime − Keras| ≤ 1e-4·max |y|.
    result = kerasbn.export_onnx(model, tmp_path / "m.onnx", inputs=x, atol=1e-4 * scale, rtol=0)

    assert result.verified and [c.batch_size for c in result.checks] == [4, 1]
    written = onnx.load(str(tmp_path / "m.onnx"))
    ops = op_counts(written)
    assert "StatefulPartitionedCall" not in ops and "BatchNormalization" not in ops, ops
    assert _bn_arithmetic(written) == []
    # Its depthwise convolutions are grouped Conv2D in Keras and grouped Convs in ONNX.
    assert any((_attribute(n, "group") or 1) > 1 for n in written.graph.node if n.op_type == "Conv")


def test_a_pass_that_changes_the_outputs_fails_loudly_and_writes_nothing(tmp_path, monkeypatch):
    def doubles_a_weight(model):
        weight = model.graph.initializer[0]
        weight.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(weight), weight.name))
        return model

    monkeypatch.setattr(onnx_passes, "PASSES", (*onnx_passes.PASSES, ("doubler", doubles_a_weight)))
    with pytest.raises(VerificationError, match="pass 'doubler' changed the outputs.*nothing written"):
        kerasbn.export_onnx(_model(*CASES["dense_bn"]), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_no_fold_and_existing_output(tmp_path):
    model = _model((5,), [lambda: L.Dense(4, use_bias=False), BN])
    path = tmp_path / "m.onnx"
    result = kerasbn.export_onnx(model, path, fold=False, opset=13)
    assert result.opset == 13 and result.op_counts_unfolded is None and result.fold_report is None
    assert result.op_counts.get("Mul", 0) >= 1  # an unfolded Dense → BN: no pass folds a Mul into a MatMul
    first = path.read_bytes()
    with pytest.raises(KerasbnError, match="already exists"):
        kerasbn.export_onnx(model, path)
    assert path.read_bytes() == first
    assert kerasbn.export_onnx(model, path, overwrite=True, verify=False).checks == ()


def test_without_passes_the_graph_is_tf2onnx_s(tmp_path):
    model = _model(*CASES["dense_bn"])
    result = kerasbn.export_onnx(model, tmp_path / "m.onnx", optimize=False)
    assert result.passes == () and result.op_counts == op_counts(to_onnx(kerasbn.fold(model).model))
    assert {"MatMul", "Add"} <= set(result.op_counts)  # tf2onnx does not fuse them with a dynamic batch
    assert kerasbn.export_onnx(model, tmp_path / "o.onnx").passes == ("MatMul + Add → Gemm",)


def test_batch_dimension_is_dynamic(tmp_path):
    model = _model(*CASES["conv1d_bn"])
    path = tmp_path / "m.onnx"
    kerasbn.export_onnx(model, path, verify=False)
    graph = onnx.load(str(path)).graph
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


def test_multi_input_multi_output(tmp_path):
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    x = BN()(L.Dense(4, use_bias=False)(a))
    model = _randomize(keras.Model({"a": a, "b": b}, {"y": L.Concatenate()([x, b]), "x": x}))
    result = kerasbn.export_onnx(model, tmp_path / "m.onnx")
    assert result.verified and "BatchNormalization" not in result.op_counts


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fold", [True, False])
def test_output_names_are_the_dict_keys_and_each_name_holds_its_output(fold, tmp_path):
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    x = BN()(L.Dense(4, use_bias=False)(a))
    # "a" is also an input's name: the output gets a suffix, the input keeps its name.
    outputs = {"scores": L.Concatenate()([x, b]), "features": x, "a": L.Dense(2)(b)}
    model = _randomize(keras.Model({"a": a, "b": b}, outputs))
    kerasbn.export(model, tmp_path / "m.onnx", fold=fold)
    session = _session(tmp_path / "m.onnx")
    assert [i.name for i in session.get_inputs()] == ["a", "b"]
    names = [o.name for o in session.get_outputs()]
    assert names == ["a_0", "features", "scores"]  # keras.tree.flatten's order: sorted keys
    rng = np.random.default_rng(3)
    feed = {"a": rng.normal(size=(2, 5)).astype("float32"), "b": rng.normal(size=(2, 3)).astype("float32")}
    expected = model.predict_on_batch(feed)
    for key, name in zip(["a", "features", "scores"], names):
        got = session.run([name], feed)[0]
        np.testing.assert_allclose(got, expected[key], rtol=0, atol=64 * EPS32 * np.abs(expected[key]).max())


def test_output_names_are_the_output_layers_names(tmp_path):
    x = keras.Input((5,), name="x")
    hidden = BN()(L.Dense(4)(x))
    model = _randomize(keras.Model(x, [L.Dense(3, name="logits")(hidden), L.Dense(2, name="embedding")(hidden)]))
    kerasbn.export(model, tmp_path / "m.onnx")
    assert [o.name for o in _session(tmp_path / "m.onnx").get_outputs()] == ["logits", "embedding"]


def test_a_subclassed_model_s_output_is_named_output(tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.bn = L.Dense(4), BN()

        def call(self, inputs):
            return self.bn(self.dense(inputs))

    model = Net()
    model(np.zeros((1, 5), "float32"))
    kerasbn.export(model, tmp_path / "m.onnx", fold=False)
    assert [o.name for o in _session(tmp_path / "m.onnx").get_outputs()] == ["output"]


def _normalization_first() -> keras.Model:
    """A preprocessing-normalized model: `Normalization` holds its mean and variance as plain tensors."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Normalization(mean=[0.4, 0.5, 0.6], variance=[0.05, 0.1, 0.2])(inputs)
    return _randomize(keras.Model(inputs, BN()(L.Conv2D(4, 3)(x))))


@pytest.mark.parametrize("fold", [True, False])
def test_a_normalization_first_model_exports_with_its_constants_as_initializers(fold, tmp_path):
    model = _normalization_first()
    path = tmp_path / "m.onnx"
    kerasbn.export(model, path, fold=fold)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"]
    x = np.random.default_rng(0).normal(0.5, 0.3, (3, 8, 8, 3)).astype("float32")
    assert_matches_original(model, file_outputs(path, "onnx", model, x), x, "float32")


@pytest.mark.large
def test_convnext_tiny_exports_and_matches_float64(tmp_path):
    """keras.applications' ConvNeXt starts with a Normalization (and has no BN: nothing to fold)."""
    keras.utils.set_random_seed(0)
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=10)
    path = tmp_path / "convnext.onnx"
    kerasbn.export(model, path)
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["input"]
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert_matches_original(model, file_outputs(path, "onnx", model, x), x, "float32")


# The hand-written passes, on graphs built directly, against ONNX Runtime on the graph before the pass.


def _conv1d_graph(constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x (N, 3, 10) → Unsqueeze → Conv (4 filters, 1×3) → Squeeze → ops in `constants` order (Mul/Add)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 1, 3)).astype("float32")
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
        helper.make_node("Conv", ["u", "w"], ["c"]),
        helper.make_node("Squeeze", ["c", "axes"], ["s0"]),
    ]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "axes"), numpy_helper.from_array(weight, "w")]
    for k, (op, value) in enumerate(constants.items()):
        nodes.append(helper.make_node(op.split("_")[0], [f"s{k}", f"k{k}"], [f"s{k + 1}"]))
        inits.append(numpy_helper.from_array(value.astype("float32"), f"k{k}"))
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "conv1d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_per_channel_mul_and_add_after_a_squeezed_conv_fold_into_it():
    rng = np.random.default_rng(1)
    model = _conv1d_graph({"Mul": rng.uniform(0.5, 2, (1, 4, 1)), "Add_bias": rng.normal(size=(4, 1))})
    x = rng.normal(size=(5, 3, 10)).astype("float32")
    before = _run(model, x)
    after_model = onnx_passes.fuse_through_squeeze(model)
    assert op_counts(after_model) == {"Conv": 1, "Squeeze": 1, "Unsqueeze": 1}
    # Each output is a 9-term dot product; scaling the weights first rounds each term differently.
    np.testing.assert_allclose(_run(after_model, x), before, rtol=0, atol=9 * EPS32 * np.abs(before).max())


@pytest.mark.parametrize(
    "constant",
    [np.ones((1, 1, 8)), np.ones((2, 4, 1)), np.ones((1, 4, 8))],
    ids=["along time", "along batch", "per element"],
)
def test_a_constant_that_varies_off_the_channel_axis_stays(constant):
    model = _conv1d_graph({"Add": constant * np.arange(constant.size).reshape(constant.shape)})
    x = np.random.default_rng(2).normal(size=(2, 3, 10)).astype("float32")
    before = _run(model, x)
    after_model = onnx_passes.fuse_through_squeeze(model)
    assert op_counts(after_model).get("Add") == 1
    np.testing.assert_array_equal(_run(after_model, x), before)


@pytest.mark.parametrize("shape, fused", [(["N", 5], True), (["N", 2, 5], False)])
def test_matmul_add_becomes_gemm_only_for_a_2d_input(shape, fused):
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.normal(size=(5, 4)).astype("float32"), "w"),
            numpy_helper.from_array(rng.normal(size=(4,)).astype("float32"), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    x = rng.normal(size=(7, *shape[1:])).astype("float32")
    before = _run(model, x)
    after_model = onnx_passes.fuse_matmul_add_into_gemm(model)
    assert op_counts(after_model) == ({"Gemm": 1} if fused else {"Add": 1, "MatMul": 1})
    np.testing.assert_allclose(_run(after_model, x), before, rtol=0, atol=5 * EPS32 * np.abs(before).max())


def test_mul_by_ones_and_add_of_zeros_are_removed_and_checked():
    # What a BN folded in place (γ = 1, β = 0, μ = 0, σ² = 1 − ε) leaves where nothing can carry it.
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Mul", ["r", "ones"], ["m"]),
            helper.make_node("Add", ["m", "zeros"], ["y"]),
        ],
        "identity_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.ones((1, 1, 4), np.float32), "ones"),
            numpy_helper.from_array(np.zeros((4,), np.float32), "zeros"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    x = np.random.default_rng(4).normal(size=(3, 5, 4)).astype("float32")
    optimized, changed = _passes(TARGET, model, True, lambda _step: None)
    assert op_counts(optimized) == {"Relu": 1} and changed == ("onnxslim",)
    np.testing.assert_array_equal(_run(optimized, x), np.maximum(x, 0))
