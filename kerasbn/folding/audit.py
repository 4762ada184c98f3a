"""`kerasbn.audit`: which BN layers of a model fold, where, and why not.

The audit changes nothing. For every BatchNormalization layer (Keras's and
kerasbn's, nested models included) it names the partner layer and the fold
direction, or the reason the BN stays; it also lists every Dense/Conv bias
that a following BN makes redundant.
"""

from __future__ import annotations

import keras

from kerasbn.folding import plan
from kerasbn.folding.graph import build_graph
from kerasbn.report import AuditReport, RedundantBias


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
    findings, plans = plan.analyse(graph)
    gained = {
        id(p.partner.layer): plan.out_channels(graph, p.partner)
        for p in plans
        if not getattr(p.partner.layer, "use_bias", False)
    }
    saved = sum(f.parameters for f in findings if f.foldable) - sum(gained.values())
    biases = [
        RedundantBias(call.layer.name, plan.path(call), bn.layer.name, plan.out_channels(graph, call))
        for call, bn in plan.redundant_biases(graph)
    ]
    return AuditReport(model.name, findings, biases, int(model.count_params()), int(saved))
