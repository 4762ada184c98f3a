"""Graph passes run on tf2onnx's output before the ONNX file is written.

tf2onnx leaves arithmetic an ONNX ``Conv``, ``ConvTranspose`` or ``Gemm``
could carry: a bias ``Add`` after a ``ConvTranspose`` or after the
``Squeeze`` of its 1-D lowering (Conv1D, SeparableConv1D), a ``MatMul`` +
``Add`` where the batch dimension is dynamic, and a ``Mul`` by ones or an
``Add`` of zeros where a BatchNormalization was folded in place (set to the
identity). `PASSES` removes them, well-kept optimizers first:

1. ``onnxslim``: constant folding, dead nodes, ``Mul`` by one and ``Add``
   of zero, Conv/ConvTranspose + BatchNormalization, Mul and Add fusion.
2. `fuse_through_squeeze` (ours): the bias ``Add`` (and a per-channel
   ``Mul``) after the ``Squeeze`` of a 1-D convolution, which onnxslim and
   onnxoptimizer do not match.
3. `fuse_matmul_add_into_gemm` (ours): ``MatMul`` + ``Add`` with a dynamic
   batch dimension; onnxslim, onnxoptimizer and tf2onnx fuse it only when
   every dimension is static.

onnxoptimizer's ``eliminate_nop_with_unit``, ``fuse_add_bias_into_conv`` and
``fuse_bn_into_conv`` find nothing onnxslim leaves, so it is not a dependency.

Every pass takes and returns an `onnx.ModelProto` and changes nothing it
cannot prove equal; the export pipeline (`kerasbn.deploy.export`) still runs
the final graph in ONNX Runtime against Keras, and replays the passes one by
one to name the one to blame when that check fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Pass = Callable[[Any], Any]


def slim(model: Any) -> Any:
    """onnxslim's default optimizations (its model check off: the caller runs ONNX Runtime)."""
    import onnxslim

    return onnxslim.slim(model)


def fuse_through_squeeze(model: Any) -> Any:
    """Fold a per-channel ``Mul`` or ``Add`` behind ``Conv|ConvTranspose → Squeeze`` into the convolution.

    tf2onnx lowers a 1-D convolution as Unsqueeze → Conv → Squeeze and applies
    the bias (and an unfolded BN's scale and shift) after the Squeeze. The
    Squeeze removes spatial axes only (never the batch axis 0 or the channel
    axis 1), so a constant that varies along axis 1 alone is the same
    per-channel constant before it: ``Squeeze(Conv(x)) + b = Squeeze(Conv(x) + b)``,
    and ``Conv(x) + b`` is the Conv with ``b`` added to its bias (``·s``: its
    weights and bias scaled along the output channels). Repeats until nothing
    matches, so a Mul then an Add both fold.
    """
    while _fold_one_through_squeeze(model.graph):
        pass
    return _drop_unused_initializers(model)


def _fold_one_through_squeeze(graph: Any) -> bool:
    from onnx import numpy_helper

    init = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    uses = _uses(graph)
    for node in graph.node:
        if node.op_type not in ("Add", "Mul"):
            continue
        squeeze, constant = _operand_and_constant(node, producer, init)
        if squeeze is None or squeeze.op_type != "Squeeze" or not _single_use(squeeze.output[0], uses, graph):
            continue
        conv = producer.get(squeeze.input[0])
        if (
            conv is None
            or conv.op_type not in ("Conv", "ConvTranspose")
            or not _single_use(conv.output[0], uses, graph)
        ):
            continue
        if any(name not in init for name in conv.input[1:] if name):
            continue
        weight = numpy_helper.to_array(init[conv.input[1]])
        rank = weight.ndim  # a convolution's output has the rank of its kernel
        axes = _squeeze_axes(squeeze, init)
        if axes is None or any(a % rank < 2 for a in axes):
            continue
        group = _group(conv)
        channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1] * group
        vector = _per_channel(numpy_helper.to_array(init[constant]), rank - len(axes), channels, weight.dtype)
        if vector is None:
            continue
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        bias = numpy_helper.to_array(init[conv.input[2]]) if has_bias else np.zeros(channels, weight.dtype)
        if node.op_type == "Add":
            bias = bias + vector
        else:
            weight = _scale_output_channels(weight, vector, conv.op_type, group)
            bias = bias * vector
        # New initializers: the old ones may be shared with other nodes.
        names = [_unique(f"{conv.output[0]}_{kind}", init) for kind in ("weight", "bias")]
        for name, value in zip(names, (weight, bias)):
            graph.initializer.append(numpy_helper.from_array(value.astype(weight.dtype), name))
            init[name] = graph.initializer[-1]
        del conv.input[1:]
        conv.input.extend(names)
        squeeze.output[0] = node.output[0]
        graph.node.remove(node)
        return True
    return False


def _scale_output_channels(weight: np.ndarray, scale: np.ndarray, op_type: str, group: int) -> np.ndarray:
    """Conv weights (M, C/g, k…) scale along axis 0; ConvTranspose (C, M/g, k…) along group × axis 1."""
    spatial = (1,) * (weight.ndim - 2)
    if op_type == "Conv":
        return weight * scale.reshape(-1, 1, *spatial)
    grouped = weight.reshape(group, weight.shape[0] // group, *weight.shape[1:])
    return (grouped * scale.reshape(group, 1, -1, *spatial)).reshape(weight.shape)


def fuse_matmul_add_into_gemm(model: Any) -> Any:
    """``MatMul(A, W) + b`` → ``Gemm(A, W, b)`` where A is 2-D, W and b constant, the batch dynamic.

    ONNX Gemm takes a 2-D A of any (also symbolic) row count, and a C that
    broadcasts to (rows, columns); b of shape (N,) or (1, N) does.
    """
    import onnx

    ranks = _ranks(onnx.shape_inference.infer_shapes(model).graph)
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    uses = _uses(graph)
    dead = []
    for add in graph.node:
        if add.op_type != "Add":
            continue
        matmul, constant = _operand_and_constant(add, producer, init)
        if matmul is None or matmul.op_type != "MatMul" or not _single_use(matmul.output[0], uses, graph):
            continue
        a, w = matmul.input
        if w not in init or ranks.get(a) != 2 or len(init[w].dims) != 2:
            continue
        if list(init[constant].dims) not in ([init[w].dims[1]], [1, init[w].dims[1]]):
            continue
        # The Add becomes the Gemm in place: A and W are computed before the MatMul, so before it too.
        add.op_type, add.name = "Gemm", matmul.name or add.name
        del add.input[:]
        add.input.extend([a, w, constant])
        dead.append(matmul)
    for node in dead:
        graph.node.remove(node)
    return model


PASSES: tuple[tuple[str, Pass], ...] = (
    ("onnxslim", slim),
    ("Conv → Squeeze → Mul/Add", fuse_through_squeeze),
    ("MatMul + Add → Gemm", fuse_matmul_add_into_gemm),
)


def fold_constant_quantize(model: Any) -> Any:
    """``QuantizeLinear`` of a constant → the integer constant it computes (ONNX's own rounding).

    tf2onnx writes a quantized weight as ``QuantizeLinear(float W) →
    DequantizeLinear``; ONNX Runtime fuses an int8 kernel only where the
    weight is ``DequantizeLinear`` of an integer constant. The constant is
    what ``QuantizeLinear`` defines: ``saturate(round(W / scale) + zero_point)``
    in float32, rounded half to even.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    dead = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(name in init for name in node.input if name):
            continue
        x = numpy_helper.to_array(init[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
        has_zero = len(node.input) > 2 and bool(node.input[2])
        zero = numpy_helper.to_array(init[node.input[2]]) if has_zero else np.zeros(scale.shape, np.uint8)
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1) % max(x.ndim, 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * x.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(x / scale) + zero.astype(np.int64), info.min, info.max).astype(zero.dtype)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        init[node.output[0]] = graph.initializer[-1]
        dead.append(node)
    for node in dead:
        graph.node.remove(node)
    return _drop_unused_initializers(model)


def move_layout_into_weights(model: Any) -> Any:
    """``DequantizeLinear(integer constant) → Reshape/Transpose`` → the Reshape/Transpose applied to the constant.

    tf2onnx writes a depthwise kernel ``(kh, kw, in, mult)`` as the
    dequantized Keras layout followed by a Reshape and a Transpose into
    ONNX's ``(in·mult, 1, kh, kw)``; ONNX Runtime fuses an int8 Conv only
    when its weight comes straight from ``DequantizeLinear``. Moving a
    layout change before the dequantization is exact (it only moves
    elements); the per-channel ``axis`` moves with its dimension, and a
    Reshape that splits or merges the channel axis is left alone. A
    per-tensor ``DequantizeLinear`` of an activation followed by a layout
    change (tf2onnx's NHWC → NCHW Reshape of a one-channel input) swaps with
    it, for the same reason.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    changed = True
    while changed:
        changed = False
        init = {t.name: t for t in graph.initializer}
        uses = _uses(graph)
        consumers = {name: node for node in graph.node for name in node.input}
        for dq in graph.node:
            if dq.op_type != "DequantizeLinear" or not all(name in init for name in dq.input[1:] if name):
                continue
            after = consumers.get(dq.output[0])
            if after is None or after.op_type not in ("Reshape", "Transpose"):
                continue
            if not _single_use(dq.output[0], uses, graph):
                continue
            if dq.input[0] not in init:
                if numpy_helper.to_array(init[dq.input[1]]).size != 1:
                    continue
                # An activation: the layout change moves before the dequantization, onto the integers.
                moved = _unique(f"{after.output[0]}_quantized", {n: None for n in uses} | init)
                after.input[0], dq.input[0] = dq.input[0], moved
                after.output[0], dq.output[0] = moved, after.output[0]
                graph.node.remove(after)
                graph.node.insert(list(graph.node).index(dq), after)
                changed = True
                break
            q = numpy_helper.to_array(init[dq.input[0]])
            scale = numpy_helper.to_array(init[dq.input[1]])
            axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
            moved = _moved_layout(after, q, axis, init)
            if moved is None:
                continue
            value, new_axis = moved
            if scale.size > 1 and new_axis is None:
                continue
            name = _unique(f"{after.output[0]}_quantized", init)
            graph.initializer.append(numpy_helper.from_array(value, name))
            dq.input[0] = name
            for attribute in list(dq.attribute):
                if attribute.name == "axis":
                    dq.attribute.remove(attribute)
            if scale.size > 1:
                dq.attribute.append(helper.make_attribute("axis", new_axis))
            dq.output[0] = after.output[0]
            graph.node.remove(after)
            changed = True
            break
    return _drop_unused_initializers(model)


def _moved_layout(node: Any, q: np.ndarray, axis: int, init: dict) -> tuple[np.ndarray, int | None] | None:
    """``(q`` laid out as ``node`` lays it out, where the channel ``axis`` went; None if it was split or merged)."""
    from onnx import helper, numpy_helper

    if node.op_type == "Transpose":
        perm = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
        perm = perm if perm is not None else list(range(q.ndim))[::-1]
        return q.transpose(perm), perm.index(axis)
    if len(node.input) < 2 or node.input[1] not in init:
        return None
    if any(a.name == "allowzero" and a.i for a in node.attribute):
        return None
    shape = [q.shape[i] if d == 0 else int(d) for i, d in enumerate(numpy_helper.to_array(init[node.input[1]]))]
    value = q.reshape(shape)
    before = int(np.prod(q.shape[:axis]))
    for k, size in enumerate(value.shape):
        if int(np.prod(value.shape[:k])) == before and size == q.shape[axis]:
            return value, k
    return value, None


def quantize_conv_bias(model: Any) -> Any:
    """A float bias of an int8 ``Conv`` or 2-D ``MatMul`` → an int32 ``DequantizeLinear`` with scale ``s_x·s_w``.

    An int8 convolution accumulates ``Σ q_x·q_w`` in int32 at scale
    ``s_x·s_w`` (per output channel), and adds its bias there, as
    ``round(b / (s_x·s_w))`` (Jacob et al. 2018, section 2.4; LiteRT
    stores biases so). tf2onnx leaves the bias a float ``Add`` after the Conv
    (or a float third input); ONNX Runtime fuses a quantized Conv
    (``QLinearConv``) only with no bias or an int32 one; a 2-D ``MatMul``
    and its bias ``Add`` become one ``Gemm`` (``QGemm``). The rounding moves
    each output by at most half of ``s_x·s_w``, far below one step of the
    requantized output.
    """
    import onnx
    from onnx import numpy_helper

    ranks = _ranks(onnx.shape_inference.infer_shapes(model).graph)
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    uses = _uses(graph)
    for conv in list(graph.node):
        if conv.op_type not in ("Conv", "MatMul"):
            continue
        scales = [_dequantized_scale(producer.get(name), init) for name in conv.input[:2]]
        if scales[0] is None or scales[1] is None or scales[0].size != 1:
            continue
        if producer[conv.input[1]].input[0] not in init:
            continue
        weight_shape = numpy_helper.to_array(init[producer[conv.input[1]].input[0]]).shape
        if conv.op_type == "MatMul" and (ranks.get(conv.input[0]) != 2 or len(weight_shape) != 2):
            continue
        channels = weight_shape[0] if conv.op_type == "Conv" else weight_shape[1]
        add = None
        if conv.op_type == "MatMul":
            readers = consumers.get(conv.output[0], [])
            if len(readers) != 1 or readers[0].op_type != "Add" or not _single_use(conv.output[0], uses, graph):
                continue
            add = readers[0]
            _, constant = _operand_and_constant(add, producer, init)
            if constant is None or list(init[constant].dims) not in ([channels], [1, channels]):
                continue
            bias = numpy_helper.to_array(init[constant]).reshape(-1)
            if bias.dtype != np.float32:
                continue
        elif len(conv.input) > 2 and conv.input[2]:
            if conv.input[2] not in init:
                continue
            bias = numpy_helper.to_array(init[conv.input[2]])
        else:
            readers = consumers.get(conv.output[0], [])
            if len(readers) != 1 or readers[0].op_type != "Add" or not _single_use(conv.output[0], uses, graph):
                continue
            add = readers[0]
            _, constant = _operand_and_constant(add, producer, init)
            rank = ranks.get(conv.output[0])
            if constant is None or rank is None:
                continue
            bias = _per_channel(numpy_helper.to_array(init[constant]), rank, channels, np.dtype(np.float32))
            if bias is None:
                continue
        step = (scales[0].astype(np.float32) * scales[1].astype(np.float32)).reshape(-1)
        step = np.broadcast_to(step, (channels,)).astype(np.float32)
        integers = np.rint(bias.astype(np.float64) / step)
        if np.any(np.abs(integers) > np.iinfo(np.int32).max):
            continue
        names = [_unique(f"{conv.output[0]}_bias_{kind}", init) for kind in ("quantized", "scale", "zero_point")]
        values = (integers.astype(np.int32), step, np.zeros(channels, np.int32))
        for name, value in zip(names, values):
            graph.initializer.append(numpy_helper.from_array(value, name))
            init[name] = graph.initializer[-1]
        bias_name = _unique(f"{conv.output[0]}_bias", init)
        graph.node.insert(
            list(graph.node).index(conv),
            onnx.helper.make_node("DequantizeLinear", names, [bias_name], axis=0, name=bias_name),
        )
        del conv.input[2:]
        conv.input.append(bias_name)
        if conv.op_type == "MatMul":  # A 2-D MatMul with a bias is a Gemm (which takes an int32 bias as C)
            conv.op_type = "Gemm"
        if add is not None:
            conv.output[0] = add.output[0]
            graph.node.remove(add)
    return _drop_unused_initializers(model)


def _dequantized_scale(node: Any, init: dict) -> np.ndarray | None:
    """The scale of a ``DequantizeLinear`` with constant scale (and, for a weight, integer constant input)."""
    from onnx import numpy_helper

    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in init:
        return None
    return numpy_helper.to_array(init[node.input[1]])


# The passes of an int8 QDQ graph (a quantization-aware model's export, `kerasbn.deploy.qat_int8`):
# after them ONNX Runtime runs QLinearConv / QGemm / QLinearMatMul, not float kernels between Q/DQ pairs.
QDQ_PASSES: tuple[tuple[str, Pass], ...] = (
    ("QuantizeLinear of constants → integer weights", fold_constant_quantize),
    ("Reshape/Transpose → integer weights", move_layout_into_weights),
    ("float Conv/MatMul bias → int32 bias", quantize_conv_bias),
)


def _uses(graph: Any) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses


def _single_use(name: str, uses: dict[str, int], graph: Any) -> bool:
    """Read by one node and not a graph output: the fusion may rename or drop it."""
    return uses.get(name, 0) == 1 and all(o.name != name for o in graph.output)


def _operand_and_constant(node: Any, producer: dict, init: dict) -> tuple[Any, str | None]:
    """(the node producing the non-constant input, the constant input's name) of a binary op."""
    first, second = node.input
    if second in init and first in producer:
        return producer[first], second
    if first in init and second in producer:
        return producer[second], first
    return None, None


def _squeeze_axes(squeeze: Any, init: dict) -> list[int] | None:
    from onnx import helper, numpy_helper

    if len(squeeze.input) > 1:  # opset 13+: axes is an input
        return numpy_helper.to_array(init[squeeze.input[1]]).tolist() if squeeze.input[1] in init else None
    for attribute in squeeze.attribute:
        if attribute.name == "axes":
            return list(helper.get_attribute_value(attribute))
    return None  # all size-1 axes: which ones is not known here


def _group(conv: Any) -> int:
    return next((a.i for a in conv.attribute if a.name == "group"), 1)


def _per_channel(constant: np.ndarray, rank: int, channels: int, dtype: np.dtype) -> np.ndarray | None:
    """`constant` as a (channels,) bias when, added to a rank-`rank` tensor, it varies along axis 1 only.

    None when it would broadcast the tensor to a larger shape, vary along
    another axis, or has another dtype.
    """
    if constant.dtype != dtype or constant.ndim > rank or rank < 2:
        return None
    aligned = constant.reshape((1,) * (rank - constant.ndim) + constant.shape)
    if any(size != 1 for axis, size in enumerate(aligned.shape) if axis != 1) or aligned.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(aligned.reshape(-1), (channels,)).copy()


def _unique(name: str, taken: dict) -> str:
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _ranks(graph: Any) -> dict[str, int]:
    ranks = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    for tensor in graph.initializer:
        ranks[tensor.name] = len(tensor.dims)
    return ranks


def _drop_unused_initializers(model: Any) -> Any:
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return model
