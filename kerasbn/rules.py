"""When a BatchNormalization layer folds into a neighbour, and if not, why.

Pure predicates over a `kerasbn.graph.Graph`: nothing here changes a model.
Each check returns a `Refusal` (a stable ``code`` for programs and a one-line
``reason`` for people) or a `Plan` naming the partner layer and direction.

A backward fold (BN after a linear layer) is exact whenever the layer's
output reaches nothing but the BN, the layer applies no activation and the
BN normalizes the layer's channel axis. A forward fold (BN before a linear
layer) is exact only where the layer never sees a zero-padded position: a
padded zero would be ``0`` instead of the BN's ``s·0 + t = t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from kerasbn.graph import Call, Graph
from kerasbn.layers import BatchNormalization as KerasbnBatchNormalization

BACKWARD = "backward"
FORWARD = "forward"

_TRANSPOSE = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def is_bn(layer: keras.layers.Layer) -> bool:
    """True for `keras.layers.BatchNormalization` and `kerasbn.BatchNormalization`."""
    return isinstance(layer, (keras.layers.BatchNormalization, KerasbnBatchNormalization))


def kind(layer: keras.layers.Layer) -> str | None:
    """The kernel layout family of a linear layer, or ``None`` for any other layer.

    One of ``"dense"``, ``"conv"``, ``"depthwise"``, ``"separable"``, ``"transpose"``.
    """
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    if isinstance(layer, _TRANSPOSE):
        return "transpose"
    if isinstance(layer, _DEPTHWISE):
        return "depthwise"
    if isinstance(layer, _SEPARABLE):
        return "separable"
    if isinstance(layer, _CONV):
        return "conv"
    return None


def channel_axis(layer: keras.layers.Layer, rank: int) -> int:
    """The (non-negative) channel axis of a linear layer's input and output of ``rank``."""
    if kind(layer) == "dense" or getattr(layer, "data_format", "channels_last") == "channels_last":
        return rank - 1
    return 1


def bn_axes(layer: keras.layers.Layer, rank: int) -> list[int]:
    """The BN's feature axes, made non-negative for an input of ``rank``."""
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted({int(a) % rank for a in axis})


def has_activation(layer: keras.layers.Layer) -> str | None:
    """The name of the activation fused into ``layer``, or ``None`` if it is linear."""
    act = getattr(layer, "activation", None)
    if act is None or act is keras.activations.linear:
        return None
    name = getattr(act, "__name__", None) or type(act).__name__
    return None if name == "linear" else name


def describe(call: Call) -> str:
    """``'name' (Class)`` for messages."""
    return f"'{call.layer.name}' ({type(call.layer).__name__})"


@dataclass(frozen=True)
class Refusal:
    """Why a BN does not fold.

    Attributes:
        code: A stable key for programs, e.g. ``"fused_activation"``.
        reason: A one-line explanation for people.
        neighbour: Name of the layer the reason is about, if any.
    """

    code: str
    reason: str
    neighbour: str | None = None


@dataclass(frozen=True)
class Plan:
    """A fold to perform.

    Attributes:
        bn: The BN call.
        partner: The linear layer's call that absorbs the BN.
        direction: ``"backward"`` (BN after the partner) or ``"forward"`` (before).
        flatten: For BN → Flatten → Dense, the Flatten call in between.
    """

    bn: Call
    partner: Call
    direction: str
    flatten: Call | None = None


def bn_refusal(graph: Graph, bn: Call) -> Refusal | None:
    """Properties of the BN itself that rule out any fold."""
    layer = bn.layer
    if getattr(layer, "renorm", False):
        return Refusal("renorm", f"'{layer.name}' uses batch renormalization; only plain BN is folded")
    if getattr(layer, "virtual_batch_size", None):
        return Refusal("virtual_batch", f"'{layer.name}' uses virtual (ghost) batches; only plain BN is folded")
    n = len(graph.calls_of(layer))
    if n > 1:
        return Refusal("shared_bn", f"'{layer.name}' is a shared BN called {n} times")
    if len(bn.inputs) != 1:
        return Refusal("unsupported", f"'{layer.name}' is called with {len(bn.inputs)} tensors")
    rank = len(graph.shapes[bn.inputs[0]])
    axes = bn_axes(layer, rank)
    if len(axes) != 1:
        return Refusal("multi_axis", f"'{layer.name}' normalizes several axes {axes}; a layer has one channel axis")
    return None


def _usable(graph: Graph, call: Call, what: str) -> Refusal | None:
    """Can the weights of the linear layer ``call`` be rewritten for this one call?"""
    layer = call.layer
    n = len(graph.calls_of(layer))
    if n > 1:
        return Refusal("shared_layer", f"{what} {describe(call)} is a shared layer called {n} times", layer.name)
    if getattr(layer, "quantization_mode", None):
        return Refusal("unsupported", f"{what} {describe(call)} is quantized ({layer.quantization_mode})", layer.name)
    if getattr(layer, "lora_enabled", False):
        return Refusal("unsupported", f"{what} {describe(call)} has LoRA enabled", layer.name)
    return None


def _partner_refusal(graph: Graph, call: Call, bn: Call, what: str) -> Refusal | None:
    """Checks shared by both directions on the linear partner ``call``."""
    refusal = _usable(graph, call, what)
    if refusal is not None:
        return refusal
    layer = call.layer
    rank = len(graph.shapes[bn.inputs[0]])
    bn_axis = bn_axes(bn.layer, rank)[0]
    axis = channel_axis(layer, rank)
    if bn_axis != axis:
        return Refusal(
            "axis_mismatch",
            f"BN axis {bn_axis} is not the channel axis {axis} of {what} {describe(call)}",
            layer.name,
        )
    return None


def backward(graph: Graph, bn: Call) -> Plan | Refusal:
    """Can ``bn`` fold into the layer that produces its input?"""
    x = bn.inputs[0]
    producer = graph.producer.get(x)
    if producer is None:
        return Refusal("model_input", f"'{bn.layer.name}' reads a model input, there is no layer before it")
    if kind(producer.layer) is None:
        return Refusal("nonlinear", f"{describe(producer)} before it is not a foldable linear layer", producer.layer.name)
    act = has_activation(producer.layer)
    if act is not None:
        return Refusal("fused_activation", f"activation '{act}' is fused into {describe(producer)}", producer.layer.name)
    readers = graph.n_readers(x)
    if readers > 1:
        extra = " (one is a model output)" if x in graph.outputs else ""
        return Refusal(
            "multiple_consumers",
            f"the output of {describe(producer)} feeds {readers} consumers{extra}",
            producer.layer.name,
        )
    refusal = _partner_refusal(graph, producer, bn, "producer")
    return refusal or Plan(bn, producer, BACKWARD)


def _padding_refusal(call: Call) -> Refusal | None:
    layer = call.layer
    kernel = layer.kernel_size
    if layer.padding != "valid" and any(k != 1 for k in kernel):
        return Refusal(
            "zero_padding",
            f"zero padding ('{layer.padding}') in {describe(call)} makes a forward fold inexact",
            layer.name,
        )
    return None


def forward(graph: Graph, bn: Call) -> Plan | Refusal:
    """Can ``bn`` fold into the layer that consumes its output?"""
    y = bn.outputs[0]
    readers = graph.n_readers(y)
    if y in graph.outputs:
        return Refusal("model_output", f"the output of '{bn.layer.name}' is a model output")
    if readers != 1:
        return Refusal("multiple_consumers", f"the output of '{bn.layer.name}' feeds {readers} consumers")
    consumer = graph.consumers_of(y)[0]
    flatten = None
    if isinstance(consumer.layer, keras.layers.Flatten):
        flat = consumer.outputs[0]
        nxt = graph.consumers_of(flat)
        if graph.n_readers(flat) != 1 or flat in graph.outputs or kind(nxt[0].layer) != "dense":
            return Refusal(
                "nonlinear", f"{describe(consumer)} after it is not followed by a single Dense layer", consumer.layer.name
            )
        if len(graph.calls_of(consumer.layer)) > 1:
            return Refusal("shared_layer", f"{describe(consumer)} is a shared layer", consumer.layer.name)
        if any(d is None for d in graph.shapes[y][1:]):
            return Refusal("unknown_shape", f"the shape {graph.shapes[y]} before {describe(consumer)} is not static")
        flatten, consumer = consumer, nxt[0]
    k = kind(consumer.layer)
    if k is None:
        return Refusal("nonlinear", f"{describe(consumer)} after it is not a foldable linear layer", consumer.layer.name)
    if k == "transpose":
        return Refusal(
            "zero_padding",
            f"{describe(consumer)} after it sums fewer taps at the borders, so a forward fold is inexact",
            consumer.layer.name,
        )
    if flatten is None:
        refusal = _partner_refusal(graph, consumer, bn, "consumer")
    else:
        # After Flatten every BN channel is spread over the Dense inputs, so
        # any BN axis folds; only the Dense itself must be rewritable.
        refusal = _usable(graph, consumer, "consumer")
    if refusal is None and k != "dense":
        refusal = _padding_refusal(consumer)
    return refusal or Plan(bn, consumer, FORWARD, flatten)


def plan(graph: Graph, bn: Call) -> Plan | Refusal:
    """Decide one BN: a backward fold if possible, else forward, else the most telling refusal."""
    refusal = bn_refusal(graph, bn)
    if refusal is not None:
        return refusal
    back = backward(graph, bn)
    if isinstance(back, Plan):
        return back
    fwd = forward(graph, bn)
    if isinstance(fwd, Plan):
        return fwd
    # Prefer the refusal about an actual linear neighbour (it names the
    # obstacle); when neither side is linear, say what is on both sides.
    if back.code not in ("nonlinear", "model_input"):
        return back
    if fwd.code not in ("nonlinear", "model_output", "multiple_consumers"):
        return fwd
    return Refusal(back.code, f"{back.reason}; {fwd.reason}", back.neighbour)


def redundant_bias(graph: Graph, call: Call) -> Call | None:
    """The BN call that makes the bias of ``call`` redundant, or ``None``.

    A bias is redundant when the layer is linear (no activation), called
    once, and its output reaches only a plain BN over its channel axis: the
    BN subtracts the mean, which absorbs any constant per-channel shift.
    """
    layer = call.layer
    if kind(layer) is None or not getattr(layer, "use_bias", False) or has_activation(layer):
        return None
    if len(graph.calls_of(layer)) != 1 or len(call.outputs) != 1:
        return None
    y = call.outputs[0]
    if graph.n_readers(y) != 1 or y in graph.outputs:
        return None
    bn = graph.consumers_of(y)[0]
    if not is_bn(bn.layer) or getattr(bn.layer, "renorm", False) or len(graph.calls_of(bn.layer)) != 1:
        return None
    if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        return None
    rank = len(graph.shapes[y])
    axes = bn_axes(bn.layer, rank)
    if axes != [channel_axis(layer, rank)]:
        return None
    return bn
