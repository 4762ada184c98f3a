"""`kerasbn.audit`: which BN layers of a model fold, where, and why not.

The audit changes nothing. For every BatchNormalization layer (Keras's and
kerasbn's, nested models included) it names the partner layer and the fold
direction, or the reason the BN stays; it also lists every Dense/Conv bias
that a following BN makes redundant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import keras
from rich.console import Group

from kerasbn import rules
from kerasbn.graph import Call, Graph, build_graph
from kerasbn.tables import bn_rows, render, table


def _path(call: Call) -> str:
    return "/".join(call.scope + (call.layer.name,))


def _n_params(layer: keras.layers.Layer) -> int:
    return int(sum(math.prod(w.shape) for w in layer.weights))


def _out_channels(layer: keras.layers.Layer, graph: Graph, call: Call) -> int:
    shape = graph.shapes[call.outputs[0]]
    return int(shape[rules.channel_axis(layer, len(shape))])


@dataclass(frozen=True)
class BNFinding:
    """What happens to one BatchNormalization layer.

    Attributes:
        layer: The BN layer's name.
        path: ``nested_model/…/layer`` for a BN inside nested models, else the name.
        partner: The layer it folds into; for a BN that stays, the neighbour the
            reason is about (``None`` when there is none).
        direction: ``"backward"`` (into the layer before), ``"forward"`` (into
            the layer after) or ``None``.
        foldable: Whether it folds.
        reason: Why not, one line; ``None`` when it folds.
        code: A stable key for the reason (``"fused_activation"``,
            ``"multiple_consumers"``, ``"shared_layer"``, ``"shared_bn"``,
            ``"axis_mismatch"``, ``"multi_axis"``, ``"zero_padding"``,
            ``"nonlinear"``, ``"model_input"``, ``"model_output"``, ``"renorm"``,
            ``"virtual_batch"``, ``"unknown_shape"``, ``"unsupported"``); ``None`` when it folds.
        parameters: The BN's weight count (all of it goes when it folds).
    """

    layer: str
    path: str
    partner: str | None
    direction: str | None
    foldable: bool
    reason: str | None
    code: str | None
    parameters: int


@dataclass(frozen=True)
class RedundantBias:
    """A Dense/Conv bias that the following BN's mean subtraction absorbs.

    Attributes:
        layer: The layer with the bias.
        path: Its path through nested models.
        bn: The BN that follows it.
        parameters: The bias size.
    """

    layer: str
    path: str
    bn: str
    parameters: int


@dataclass
class AuditReport:
    """The audit of one model.

    Attributes:
        model: The model's name.
        batch_norms: One `BNFinding` per BN layer, in graph order.
        redundant_biases: One `RedundantBias` per redundant bias.
        bn_layers: Number of BN layers.
        foldable: Number of BN layers that fold.
        parameters: Weight count of the model.
        parameters_saved: Weights a fold removes (folded BN weights minus the
            biases that partners without one gain).
        bias_parameters: Weights `kerasbn.strip_redundant_biases` removes.
    """

    model: str
    batch_norms: list[BNFinding] = field(default_factory=list)
    redundant_biases: list[RedundantBias] = field(default_factory=list)
    parameters: int = 0
    parameters_saved: int = 0

    @property
    def bn_layers(self) -> int:
        return len(self.batch_norms)

    @property
    def foldable(self) -> int:
        return sum(f.foldable for f in self.batch_norms)

    @property
    def bias_parameters(self) -> int:
        return sum(b.parameters for b in self.redundant_biases)

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``model``, ``totals``, ``batch_norms``, ``redundant_biases``."""
        return {
            "model": self.model,
            "totals": {
                "bn_layers": self.bn_layers,
                "foldable": self.foldable,
                "not_foldable": self.bn_layers - self.foldable,
                "parameters": self.parameters,
                "parameters_saved": self.parameters_saved,
                "redundant_biases": len(self.redundant_biases),
                "bias_parameters": self.bias_parameters,
            },
            "batch_norms": [asdict(f) for f in self.batch_norms],
            "redundant_biases": [asdict(b) for b in self.redundant_biases],
        }

    def __rich__(self) -> Group:
        caption = (
            f"{self.foldable}/{self.bn_layers} BN layers fold, saving {self.parameters_saved:,} "
            f"of {self.parameters:,} parameters"
        )
        parts = [
            table(
                f"BatchNormalization layers in '{self.model}'",
                ["BN", "partner", "direction", "folds", "reason"],
                bn_rows(self.batch_norms),
                caption,
            )
        ]
        if self.redundant_biases:
            parts.append(
                table(
                    "Redundant biases",
                    ["layer", "BN", "parameters"],
                    [[b.path, b.bn, f"{b.parameters:,}"] for b in self.redundant_biases],
                    f"{len(self.redundant_biases)} biases, {self.bias_parameters:,} parameters",
                )
            )
        return Group(*parts)

    def __str__(self) -> str:
        return render(self)


def analyse(graph: Graph) -> tuple[list[BNFinding], list[rules.Plan]]:
    """Decide every BN of ``graph``: the findings and the folds to perform."""
    findings, plans = [], []
    seen: set[int] = set()
    for call in graph.calls:
        if not rules.is_bn(call.layer) or id(call.layer) in seen:
            continue
        seen.add(id(call.layer))
        decision = rules.plan(graph, call)
        params = _n_params(call.layer)
        if isinstance(decision, rules.Plan):
            plans.append(decision)
            findings.append(
                BNFinding(
                    call.layer.name, _path(call), decision.partner.layer.name, decision.direction, True, None, None, params
                )
            )
        else:
            findings.append(
                BNFinding(
                    call.layer.name, _path(call), decision.neighbour, None, False, decision.reason, decision.code, params
                )
            )
    return findings, plans


def redundant_biases(graph: Graph) -> list[tuple[Call, Call]]:
    """``(layer call, BN call)`` for every redundant bias in ``graph``."""
    pairs = []
    for call in graph.calls:
        bn = rules.redundant_bias(graph, call)
        if bn is not None:
            pairs.append((call, bn))
    return pairs


def audit(model: keras.Model) -> AuditReport:
    """Report which BN layers of ``model`` fold and which biases are redundant.

    Args:
        model: A Functional or Sequential Keras model; nested models are searched too.

    Returns:
        An `AuditReport`; ``print(report)`` shows tables, ``report.to_dict()`` is JSON-ready.

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` has no functional graph.

    Example:

    >>> import keras, kerasbn
    >>> x = keras.Input((8, 8, 3))
    >>> y = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
    >>> kerasbn.audit(keras.Model(x, y)).foldable
    1
    """
    graph = build_graph(model)
    findings, plans = analyse(graph)
    gained = {
        id(p.partner.layer): _out_channels(p.partner.layer, graph, p.partner)
        for p in plans
        if not getattr(p.partner.layer, "use_bias", False)
    }
    saved = sum(f.parameters for f in findings if f.foldable) - sum(gained.values())
    biases = [
        RedundantBias(call.layer.name, _path(call), bn.layer.name, _out_channels(call.layer, graph, call))
        for call, bn in redundant_biases(graph)
    ]
    return AuditReport(model.name, findings, biases, int(model.count_params()), int(saved))
