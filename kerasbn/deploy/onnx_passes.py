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
cannot prove equal; `kerasbn.deploy.onnx.export_onnx` still runs ONNX
Runtime after each one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kerasbn.errors import UnsupportedModelError, VerificationError

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


def run_passes(
    model: Any, feed: Sequence[np.ndarray] | None, *, atol: float | None = None, rtol: float | None = None
) -> tuple[Any, tuple[str, ...]]:
    """Run `PASSES` on `model`; returns the new model and the names of the passes that changed its op counts.

    With `feed` (the graph's inputs in order), ONNX Runtime runs the graph
    before and after each pass that changed it on it, and a pass that changes the outputs
    beyond `kerasbn.deploy.verify.compare`'s check (element-wise with ``atol``/``rtol``) raises
    `VerificationError` naming it.

    Raises:
        VerificationError: a pass changed the outputs.
        UnsupportedModelError: a pass failed on the graph.
    """
    from kerasbn.deploy.onnx import op_counts
    from kerasbn.deploy.verify import compare

    changed = []
    reference = None if feed is None else _onnxruntime(model, feed)
    for name, transform in PASSES:
        before = op_counts(model)
        try:
            candidate = transform(_copy(model))
        except Exception as exc:  # the optimizers raise whatever their internals do
            raise UnsupportedModelError(f"ONNX pass '{name}' failed: {str(exc).strip().splitlines()[0]}") from exc
        # A pass that left the graph as it was (equal protos) computes what it did: no session to run.
        if feed is not None and candidate != model:
            outputs = _onnxruntime(candidate, feed)
            check = compare(reference, outputs, batch_size=int(feed[0].shape[0]), atol=atol, rtol=rtol)
            if not check.passed:
                raise VerificationError(
                    f"ONNX pass '{name}' changed the outputs: max |error| {check.max_abs_error:.3g} "
                    f"exceeds {check.tolerance}; nothing written"
                )
        if op_counts(candidate) != before:
            changed.append(name)
        model = candidate
    return model, tuple(changed)


def _copy(model: Any) -> Any:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _onnxruntime(model: Any, feed: Sequence[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a for i, a in zip(session.get_inputs(), feed)})


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
