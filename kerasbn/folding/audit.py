"""`kerasbn.audit`: which BN layers of a model fold, where, and why not.

The audit changes nothing. For every BatchNormalization layer (Keras's and
kerasbn's, nested models included) it names the partner layer and the fold
direction, or the reason the BN stays; it also lists every Dense/Conv bias
that a following BN makes redundant, and every weight holding NaN, infinite
values or a negative variance (`kerasbn.folding.model_checks`).
"""

from __future__ import annotations

import keras

from kerasbn.errors import UnsupportedModelError
from kerasbn.folding import dataflow, plan
from kerasbn.folding.families import unwrap
from kerasbn.folding.graph import Graph, build_graph
from kerasbn.folding.model_checks import weight_problems
from kerasbn.folding.reports import AuditReport, RedundantBias


def bn_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every BN layer of ``model`` at any depth (nested models, custom layers), each once."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True) if plan.is_bn(layer)]


def decisions(model: keras.Model) -> tuple[Graph, plan.Decisions]:
    """The functional graph of ``model`` and every BN decided (`plan.decide`).

    The model is traced only when the functional graph leaves a BN unseen
    or unfolded: a plain Keras model needs no trace.
    """
    graph = build_graph(model)
    bns = bn_layers(model)
    traced = None
    for bn in bns:
        calls = graph.calls_of(bn)
        if not calls or not isinstance(plan.plan(graph, calls[0]), plan.Plan):
            try:
                traced = dataflow.build_traced_graph(model)
            except UnsupportedModelError:
                # Without a trace those BNs stay, reported as untraced.
                traced = None
            break
    return graph, plan.decide(bns, graph, traced)


def audit(model: keras.Model) -> AuditReport:
    """Report which BN layers of ``model`` fold and which biases are redundant.

    Args:
        model: A Keras model: Functional, Sequential or subclassed; BN layers in
            nested models and inside custom layers are found too.

    Returns:
        An `AuditReport`; ``print(report)`` shows tables, ``report.to_dict()`` is JSON-ready.

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` is no Keras model or an unbuilt one.

    Examples:
        >>> import keras, kerasbn
        >>> x = keras.Input((8, 8, 3))
        >>> y = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
        >>> kerasbn.audit(keras.Model(x, y)).foldable
        1
    """
    graph, decided = decisions(model)
    findings = decided.findings
    gained = {
        id(p.partner.layer): plan.out_channels(graph, p.partner)
        for p in decided.removals
        if not getattr(unwrap(p.partner.layer), "use_bias", False)
    }
    # A BN folded in place stays as an identity, so it saves nothing.
    saved = sum(f.parameters for f in findings if f.foldable and f.how != plan.IN_PLACE) - sum(gained.values())
    biases = [
        RedundantBias(call.layer.name, plan.path(call), bn.layer.name, plan.out_channels(graph, call))
        for call, bn in plan.redundant_biases(graph)
    ]
    return AuditReport(
        model=model.name,
        batch_norms=findings,
        redundant_biases=biases,
        parameters=int(model.count_params()),
        parameters_saved=int(saved),
        weight_problems=weight_problems(model),
    )
