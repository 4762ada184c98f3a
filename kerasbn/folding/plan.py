"""Which BatchNormalization folds into which neighbour, and if not, why.

Pure decisions over a `kerasbn.folding.graph.Graph` (the functional graph,
or the traced one of `kerasbn.folding.dataflow`): nothing here changes a
model. Each BN gets a `Plan` (the partner layer and the direction) or a
`Refusal` (a `Reason` code for programs and a one-line reason for people);
`decide` chooses, per BN, between removing it through the functional graph
and folding it in place through the trace.

A backward fold (BN after a linear layer) is exact whenever the layer's
output reaches nothing but the BN, the layer applies no activation and the
BN normalizes the layer's channel axis. A forward fold (BN before a linear
layer) is exact only where the layer never sees a zero-padded position; each
family in `kerasbn.folding.families` says when that is.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import keras

from kerasbn.folding.families import Dense, family_of, is_bn, unwrap
from kerasbn.folding.graph import Call, Graph, Op
from kerasbn.folding.reports import BNFinding

BACKWARD = "backward"
FORWARD = "forward"
# How a fold is carried out: the BN layer leaves the model, or it stays as an
# exact identity (γ = 1, β = 0 or the partner's new bias, μ = 0, σ² + ε = 1).
REMOVED = "removed"
IN_PLACE = "in_place"


class Reason(str, enum.Enum):
    """Why a BN stays: the stable ``code`` of reports and JSON (its value)."""

    FUSED_ACTIVATION = "fused_activation"
    MULTIPLE_CONSUMERS = "multiple_consumers"
    SHARED_LAYER = "shared_layer"
    SHARED_BN = "shared_bn"
    AXIS_MISMATCH = "axis_mismatch"
    MULTI_AXIS = "multi_axis"
    ZERO_PADDING = "zero_padding"
    NONLINEAR = "nonlinear"
    MODEL_INPUT = "model_input"
    MODEL_OUTPUT = "model_output"
    UNKNOWN_SHAPE = "unknown_shape"
    UNSUPPORTED = "unsupported"
    UNTRACED = "untraced"
    UNUSED = "unused"
    NO_BIAS_SLOT = "no_bias_slot"

    def __str__(self) -> str:
        return self.value


def bn_axes(layer: keras.layers.Layer, rank: int) -> list[int]:
    """The BN's feature axes, made non-negative for an input of ``rank``."""
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted({int(a) % rank for a in axis})


def activation_name(layer: keras.layers.Layer) -> str | None:
    """The name of the activation fused into ``layer`` (a wrapped layer's), or ``None`` if it is linear."""
    act = getattr(unwrap(layer), "activation", None)
    if act is None or act is keras.activations.linear:
        return None
    name = getattr(act, "__name__", None) or type(act).__name__
    return None if name == "linear" else name


def describe(call: Call) -> str:
    """``'name' (Class)`` for messages (``operation 'name' (Type)`` for a traced op)."""
    if isinstance(call.layer, Op):
        return f"operation '{call.layer.name}' ({call.layer.type})"
    return f"'{call.layer.name}' ({type(call.layer).__name__})"


@dataclass(frozen=True)
class Refusal:
    """Why a BN does not fold.

    Attributes:
        code: The `Reason`.
        reason: A one-line explanation for people.
        neighbour: Name of the layer the reason is about, if any.
    """

    code: Reason
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
    """Properties of the BN itself that rule out any fold.

    Renorm and virtual (ghost) batches change only training: at inference
    both BN classes apply ``γ·(x − μ)/√(σ² + ε) + β`` with their moving
    statistics, as a plain BN does, so they fold like one.
    """
    layer = bn.layer
    n = len(graph.calls_of(layer))
    if n > 1:
        return Refusal(Reason.SHARED_BN, f"'{layer.name}' is a shared BN called {n} times")
    if len(bn.inputs) != 1:
        return Refusal(Reason.UNSUPPORTED, f"'{layer.name}' is called with {len(bn.inputs)} tensors")
    rank = len(graph.shapes[bn.inputs[0]])
    if not rank:
        return Refusal(Reason.UNKNOWN_SHAPE, f"the rank of the input of '{layer.name}' is not known")
    axes = bn_axes(layer, rank)
    if len(axes) != 1:
        return Refusal(
            Reason.MULTI_AXIS, f"'{layer.name}' normalizes several axes {axes}; a layer has one channel axis"
        )
    return None


def _usable(graph: Graph, call: Call, what: str) -> Refusal | None:
    """Can the weights of the linear layer ``call`` be rewritten for this one call?"""
    layer = call.layer
    n = len(graph.calls_of(layer))
    if n > 1:
        return Refusal(Reason.SHARED_LAYER, f"{what} {describe(call)} is a shared layer called {n} times", layer.name)
    inner = unwrap(layer)
    if getattr(inner, "quantization_mode", None):
        return Refusal(
            Reason.UNSUPPORTED, f"{what} {describe(call)} is quantized ({inner.quantization_mode})", layer.name
        )
    if getattr(inner, "lora_enabled", False):
        return Refusal(Reason.UNSUPPORTED, f"{what} {describe(call)} has LoRA enabled", layer.name)
    return None


def _partner_refusal(graph: Graph, call: Call, bn: Call, what: str) -> Refusal | None:
    """Checks shared by both directions on the linear partner ``call``."""
    refusal = _usable(graph, call, what)
    if refusal is not None:
        return refusal
    layer = call.layer
    rank = len(graph.shapes[bn.inputs[0]])
    bn_axis = bn_axes(bn.layer, rank)[0]
    axis = family_of(layer).channel_axis(layer, rank)
    if bn_axis != axis:
        return Refusal(
            Reason.AXIS_MISMATCH,
            f"BN axis {bn_axis} is not the channel axis {axis} of {what} {describe(call)}",
            layer.name,
        )
    return None


def backward(graph: Graph, bn: Call) -> Plan | Refusal:
    """Can ``bn`` fold into the layer that produces its input?"""
    x = bn.inputs[0]
    producer = graph.producer.get(x)
    if producer is None:
        return Refusal(Reason.MODEL_INPUT, f"'{bn.layer.name}' reads a model input, there is no layer before it")
    if family_of(producer.layer) is None:
        return Refusal(
            Reason.NONLINEAR, f"{describe(producer)} before it is not a foldable linear layer", producer.layer.name
        )
    act = activation_name(producer.layer)
    if act is not None:
        return Refusal(
            Reason.FUSED_ACTIVATION, f"activation '{act}' is fused into {describe(producer)}", producer.layer.name
        )
    readers = graph.n_readers(x)
    if readers > 1:
        extra = " (one is a model output)" if x in graph.outputs else ""
        return Refusal(
            Reason.MULTIPLE_CONSUMERS,
            f"the output of {describe(producer)} feeds {readers} consumers{extra}",
            producer.layer.name,
        )
    refusal = _partner_refusal(graph, producer, bn, "producer")
    return refusal or Plan(bn, producer, BACKWARD)


def _through_flatten(graph: Graph, bn: Call, flatten: Call) -> Call | Refusal:
    """The Dense after BN → Flatten, or why BN → Flatten → … does not fold."""
    y = bn.outputs[0]
    flat = flatten.outputs[0]
    nxt = graph.consumers_of(flat)
    if graph.n_readers(flat) != 1 or flat in graph.outputs or not isinstance(family_of(nxt[0].layer), Dense):
        return Refusal(
            Reason.NONLINEAR,
            f"{describe(flatten)} after it is not followed by a single Dense layer",
            flatten.layer.name,
        )
    if len(graph.calls_of(flatten.layer)) > 1:
        return Refusal(Reason.SHARED_LAYER, f"{describe(flatten)} is a shared layer", flatten.layer.name)
    if any(d is None for d in graph.shapes[y][1:]):
        return Refusal(Reason.UNKNOWN_SHAPE, f"the shape {graph.shapes[y]} before {describe(flatten)} is not static")
    return nxt[0]


def forward(graph: Graph, bn: Call) -> Plan | Refusal:
    """Can ``bn`` fold into the layer that consumes its output?"""
    y = bn.outputs[0]
    readers = graph.n_readers(y)
    if y in graph.outputs:
        return Refusal(Reason.MODEL_OUTPUT, f"the output of '{bn.layer.name}' is a model output")
    if readers != 1:
        return Refusal(Reason.MULTIPLE_CONSUMERS, f"the output of '{bn.layer.name}' feeds {readers} consumers")
    consumer = graph.consumers_of(y)[0]
    flatten = None
    if isinstance(consumer.layer, keras.layers.Flatten):
        dense = _through_flatten(graph, bn, consumer)
        if isinstance(dense, Refusal):
            return dense
        flatten, consumer = consumer, dense
    family = family_of(consumer.layer)
    if family is None:
        return Refusal(
            Reason.NONLINEAR, f"{describe(consumer)} after it is not a foldable linear layer", consumer.layer.name
        )
    inexact = family.forward_inexact(consumer.layer, describe(consumer))
    if not family.forward_foldable:
        return Refusal(Reason.ZERO_PADDING, inexact, consumer.layer.name)
    if flatten is None:
        refusal = _partner_refusal(graph, consumer, bn, "consumer")
    else:
        # After Flatten every BN channel is spread over the Dense inputs, so
        # any BN axis folds; only the Dense itself must be rewritable.
        refusal = _usable(graph, consumer, "consumer")
    if refusal is None and inexact is not None:
        refusal = Refusal(Reason.ZERO_PADDING, inexact, consumer.layer.name)
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
    if back.code not in (Reason.NONLINEAR, Reason.MODEL_INPUT):
        return back
    if fwd.code not in (Reason.NONLINEAR, Reason.MODEL_OUTPUT, Reason.MULTIPLE_CONSUMERS):
        return fwd
    return Refusal(back.code, f"{back.reason}; {fwd.reason}", back.neighbour)


def path(call: Call) -> str:
    """``nested_model/…/layer`` for a call inside nested models, else the layer name."""
    return "/".join(call.scope + (call.layer.name,))


def n_params(layer: keras.layers.Layer) -> int:
    """The layer's weight count."""
    return int(sum(math.prod(w.shape) for w in layer.weights))


def out_channels(graph: Graph, call: Call) -> int:
    """Output channels of the linear layer of ``call``."""
    shape = graph.shapes[call.outputs[0]]
    return int(shape[family_of(call.layer).channel_axis(call.layer, len(shape))])


def redundant_bias(graph: Graph, call: Call) -> Call | None:
    """The BN call that makes the bias of ``call`` redundant, or ``None``.

    A bias is redundant when the layer is linear (no activation), called
    once, and its output reaches only a plain BN over its channel axis: the
    BN subtracts the mean, which absorbs any constant per-channel shift.
    """
    layer = call.layer
    family = family_of(layer)
    if family is None or not getattr(unwrap(layer), "use_bias", False) or activation_name(layer):
        return None
    if len(graph.calls_of(layer)) != 1 or len(call.outputs) != 1:
        return None
    y = call.outputs[0]
    if graph.n_readers(y) != 1 or y in graph.outputs:
        return None
    bn = graph.consumers_of(y)[0]
    if not is_bn(bn.layer) or getattr(bn.layer, "renorm", False) or len(graph.calls_of(bn.layer)) != 1:
        return None
    if getattr(unwrap(layer), "quantization_mode", None) or getattr(unwrap(layer), "lora_enabled", False):
        return None
    rank = len(graph.shapes[y])
    if bn_axes(bn.layer, rank) != [family.channel_axis(layer, rank)]:
        return None
    return bn


def redundant_biases(graph: Graph) -> list[tuple[Call, Call]]:
    """``(layer call, BN call)`` for every redundant bias in ``graph``."""
    pairs = []
    for call in graph.calls:
        bn = redundant_bias(graph, call)
        if bn is not None:
            pairs.append((call, bn))
    return pairs


def in_place_refusal(step: Plan) -> Refusal | None:
    """Why ``step`` cannot be done by rewriting weights in place (the layers keep their configs), or ``None``.

    In place, the BN stays as an exact identity and the partner keeps its
    config: a backward fold's new bias goes into the partner's bias or else
    into the BN's β; a forward fold's shift has to go into the partner's bias.
    """
    partner = step.partner.layer
    if getattr(unwrap(partner), "use_bias", False):
        return None
    if step.direction == BACKWARD and getattr(step.bn.layer, "center", True):
        return None
    return Refusal(
        Reason.NO_BIAS_SLOT,
        f"{describe(step.partner)} has no bias to take the folded shift and cannot gain one in place",
        partner.name,
    )


@dataclass
class Decisions:
    """Every BN of a model decided, over its functional graph and its traced graph.

    Attributes:
        findings: One `BNFinding` per BN layer, in the model's layer order.
        removals: Folds that remove the BN from the functional graph.
        in_place: Folds (found in the traced graph) done by rewriting weights in place.
        bns: The BN layer of each finding.
    """

    findings: list[BNFinding]
    removals: list[Plan]
    in_place: list[Plan]
    bns: list[keras.layers.Layer]


def _finding(bn: keras.layers.Layer, where: str, decision: Plan | Refusal, how: str | None = None) -> BNFinding:
    params = n_params(bn)
    if isinstance(decision, Plan):
        return BNFinding(
            layer=bn.name,
            path=where,
            partner=decision.partner.layer.name,
            direction=decision.direction,
            foldable=True,
            reason=None,
            code=None,
            parameters=params,
            how=how,
        )
    return BNFinding(
        layer=bn.name,
        path=where,
        partner=decision.neighbour,
        direction=None,
        foldable=False,
        reason=decision.reason,
        code=decision.code,
        parameters=params,
    )


def _unseen(bn: keras.layers.Layer, traced: Graph | None) -> Refusal:
    """Why a BN that no graph shows called stays."""
    if traced is None:
        return Refusal(
            Reason.UNTRACED,
            f"'{bn.name}' is inside a layer the model's graph does not show, and the model could not be traced",
        )
    if id(bn) in traced.unscoped:
        return Refusal(
            Reason.UNTRACED,
            f"the variables of '{bn.name}' are read outside its own call, so its computation cannot be traced",
        )
    return Refusal(Reason.UNUSED, f"'{bn.name}' is never called when the model runs (built but unused)")


def decide(bns: list[keras.layers.Layer], functional: Graph | None, traced: Graph | None) -> Decisions:
    """Decide each BN in ``bns``: removed through the functional graph if it allows, else in place through the trace.

    The traced graph sees inside custom layers and subclassed models, where
    the functional graph sees one opaque call; a BN whose functional plan is
    refused (a custom layer next to it) gets a second chance there. A BN the
    functional graph does not show is decided by the trace alone.
    """
    out = Decisions([], [], [], list(bns))
    for bn in bns:
        f_calls = functional.calls_of(bn) if functional is not None else []
        t_calls = traced.calls_of(bn) if traced is not None else []
        decision: Plan | Refusal | None = None
        if f_calls:
            decision = plan(functional, f_calls[0])
            if isinstance(decision, Plan):
                out.removals.append(decision)
                out.findings.append(_finding(bn, path(f_calls[0]), decision, REMOVED))
                continue
        if t_calls:
            traced_decision = plan(traced, t_calls[0])
            if isinstance(traced_decision, Plan):
                traced_decision = in_place_refusal(traced_decision) or traced_decision
            if isinstance(traced_decision, Plan):
                out.in_place.append(traced_decision)
                out.findings.append(_finding(bn, path(t_calls[0]), traced_decision, IN_PLACE))
                continue
            # A functional refusal names Keras layers, which users know best.
            decision = decision or traced_decision
        if decision is None:
            decision = _unseen(bn, traced)
        where = path(f_calls[0]) if f_calls else (path(t_calls[0]) if t_calls else bn.name)
        out.findings.append(_finding(bn, where, decision))
    return out
