"""The QDQ graph passes on small hand-made graphs: ONNX Runtime's outputs before and after, and the fused kernels.

Each graph is the pattern tf2onnx writes for a quantization-aware model
(`kerasbn.deploy.qat_int8`); the reference is ONNX Runtime running the graph
before the pass.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kerasbn.deploy.onnx_passes import fold_constant_quantize, move_layout_into_weights, quantize_conv_bias

OPSET = 17


def run(model, x: np.ndarray, tmp_path=None) -> tuple[np.ndarray, list[str]]:
    """(output, op types of ONNX Runtime's optimized graph) of a one-input model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ops: list[str] = []
    if tmp_path is not None:
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    if tmp_path is not None:
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return y, ops


def graph(nodes, initializers, x_shape, y_shape) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
            [numpy_helper.from_array(v, k) for k, v in initializers.items()],
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    onnx.checker.check_model(model)
    return model


def quantized_input(scale: float = 0.05, zero: int = 128) -> tuple[list, dict]:
    """x → QuantizeLinear → DequantizeLinear ("xq"), per tensor, uint8."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["xq"]),
    ]
    return nodes, {"sx": np.array(scale, np.float32), "zx": np.array(zero, np.uint8)}


@pytest.mark.parametrize("seed", [0, 1])
def test_fold_constant_quantize_computes_what_quantize_linear_does(seed):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.01, 0.05, 6).astype(np.float32)
    w = rng.normal(0, 1, (6, 3, 3, 3)).astype(np.float32)
    w[0, 0, 0, :] = (np.array([0.5, 1.5, -2.5], np.float32) * scale[0]).astype(np.float32)  # ties: half to even
    nodes, init = quantized_input()
    nodes += [
        helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["w_q"], axis=0),
        helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["wq"], axis=0),
        helper.make_node("Conv", ["xq", "wq"], ["y"], pads=[1, 1, 1, 1]),
    ]
    init.update(w=w, sw=scale, zw=np.zeros(6, np.int8))
    before = graph(nodes, init, [2, 3, 5, 5], [2, 6, 5, 5])
    x = rng.uniform(-3, 3, (2, 3, 5, 5)).astype(np.float32)
    expected, _ = run(before, x)
    after = fold_constant_quantize(onnx.ModelProto.FromString(before.SerializeToString()))
    assert "w_q" in {t.name for t in after.graph.initializer}
    assert [n.op_type for n in after.graph.node].count("QuantizeLinear") == 1
    got, _ = run(after, x)
    np.testing.assert_array_equal(got, expected)


def depthwise(rng, per_channel: bool) -> tuple[onnx.ModelProto, int]:
    """tf2onnx's depthwise weight: DequantizeLinear of (kh, kw, C, 1) → Reshape (kh, kw, 1, C) → Transpose → Conv."""
    channels = 4
    q = rng.integers(-127, 128, (3, 3, channels, 1)).astype(np.int8)
    scale = rng.uniform(0.01, 0.05, channels if per_channel else ()).astype(np.float32)
    nodes, init = quantized_input()
    dq = {"axis": 2} if per_channel else {}
    nodes += [
        helper.make_node("DequantizeLinear", ["w_int", "sw", "zw"], ["w_dq"], **dq),
        helper.make_node("Reshape", ["w_dq", "shape"], ["w_r"]),
        helper.make_node("Transpose", ["w_r"], ["w"], perm=[3, 2, 0, 1]),
        helper.make_node("Conv", ["xq", "w"], ["y"], group=channels, pads=[1, 1, 1, 1]),
    ]
    zero = np.zeros(scale.shape, np.int8)
    init.update(w_int=q, sw=scale, zw=zero, shape=np.array([3, 3, 1, channels], np.int64))
    return graph(nodes, init, [1, channels, 6, 6], [1, channels, 6, 6]), channels


@pytest.mark.parametrize("per_channel", [True, False])
def test_move_layout_into_weights_feeds_the_conv_from_dequantize(per_channel, tmp_path):
    rng = np.random.default_rng(2)
    before, channels = depthwise(rng, per_channel)
    x = rng.uniform(-3, 3, (1, channels, 6, 6)).astype(np.float32)
    expected, _ = run(before, x)
    after = move_layout_into_weights(onnx.ModelProto.FromString(before.SerializeToString()))
    ops = [n.op_type for n in after.graph.node]
    assert "Reshape" not in ops and "Transpose" not in ops
    conv = next(n for n in after.graph.node if n.op_type == "Conv")
    producer = {o: n for n in after.graph.node for o in n.output}
    weight = producer[conv.input[1]]
    assert weight.op_type == "DequantizeLinear"
    init = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert init[weight.input[0]].shape == (channels, 1, 3, 3)
    if per_channel:
        assert helper.get_attribute_value(next(a for a in weight.attribute if a.name == "axis")) == 0
    got, _ = run(after, x)
    np.testing.assert_array_equal(got, expected)


def test_move_layout_moves_an_activation_reshape_before_its_dequantize():
    nodes, init = quantized_input()
    nodes += [helper.make_node("Reshape", ["xq", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    init["shape"] = np.array([2, 1, 3, 4], np.int64)
    before = graph(nodes, init, [2, 3, 4, 1], [2, 1, 3, 4])
    x = np.random.default_rng(3).uniform(-3, 3, (2, 3, 4, 1)).astype(np.float32)
    expected, _ = run(before, x)
    after = move_layout_into_weights(onnx.ModelProto.FromString(before.SerializeToString()))
    assert [n.op_type for n in after.graph.node] == ["QuantizeLinear", "Reshape", "DequantizeLinear", "Relu"]
    got, _ = run(after, x)
    np.testing.assert_array_equal(got, expected)


def biased(rng, op: str) -> tuple[onnx.ModelProto, np.ndarray, float]:
    """DequantizeLinear input and weight → Conv or 2-D MatMul → Add(float bias) → QuantizeLinear → DequantizeLinear."""
    nodes, init = quantized_input()
    if op == "Conv":
        q = rng.integers(-127, 128, (5, 3, 3, 3)).astype(np.int8)
        scale, axis, shape, out = rng.uniform(0.01, 0.05, 5).astype(np.float32), 0, [1, 5, 1, 1], [2, 5, 4, 4]
        x_shape = [2, 3, 4, 4]
        bias = rng.normal(0, 0.5, shape).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["xq", "wq"], ["z"], pads=[1, 1, 1, 1]))
    else:
        q = rng.integers(-127, 128, (6, 5)).astype(np.int8)
        scale, axis, shape, out, x_shape = np.array(0.02, np.float32), 1, [5], [2, 5], [2, 6]
        bias = rng.normal(0, 0.5, shape).astype(np.float32)
        nodes.append(helper.make_node("MatMul", ["xq", "wq"], ["z"]))
    nodes.insert(2, helper.make_node("DequantizeLinear", ["w_int", "sw", "zw"], ["wq"], axis=axis))
    nodes += [
        helper.make_node("Add", ["z", "b"], ["zb"]),
        helper.make_node("QuantizeLinear", ["zb", "sy", "zy"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "sy", "zy"], ["y"]),
    ]
    init.update(w_int=q, sw=scale, zw=np.zeros(scale.shape, np.int8), b=bias)
    init.update(sy=np.array(0.1, np.float32), zy=np.array(128, np.uint8))
    return graph(nodes, init, x_shape, out), scale, float(init["sx"])


@pytest.mark.parametrize(("op", "fused"), [("Conv", "QLinearConv"), ("MatMul", "QGemm")])
def test_quantize_conv_bias_gives_the_integer_kernel_its_int32_bias(op, fused, tmp_path):
    rng = np.random.default_rng(4)
    before, _, _ = biased(rng, op)
    x = rng.uniform(-3, 3, [d.dim_value for d in before.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    expected, _ = run(before, x)
    after = quantize_conv_bias(onnx.ModelProto.FromString(before.SerializeToString()))
    ops = [n.op_type for n in after.graph.node]
    assert "Add" not in ops and ops.count("DequantizeLinear") == 4
    kernel = next(n for n in after.graph.node if n.op_type in ("Conv", "Gemm"))
    init = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    producer = {o: n for n in after.graph.node for o in n.output}
    assert init[producer[kernel.input[2]].input[0]].dtype == np.int32
    got, optimized = run(after, x, tmp_path)
    assert fused in optimized and op not in optimized
    # The bias moves by at most half an accumulator step (s_x·s_w), far below the output's step (0.1):
    # the requantized outputs agree but where the float sum lay within that of a rounding boundary.
    assert np.mean(got == expected) > 0.99 and np.max(np.abs(got - expected)) <= 0.1 + 1e-6
