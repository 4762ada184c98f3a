"""`kerasbn.strip_redundant_biases`: the training-time rewrite.

For ``z = BN(W·u + b)`` the bias ``b`` is absorbed by the BN's mean
subtraction (Ioffe & Szegedy, 2015, §3.2), so the layer can drop it. In
training the batch mean absorbs it; in inference moving the bias into the
moving mean, ``μ ← μ − b``, keeps ``(W·u + b − μ)·s + β = (W·u − (μ − b))·s + β``.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from kerasbn.folding import families, plan
from kerasbn.folding.graph import build_graph
from kerasbn.folding.reports import RedundantBias, StripReport
from kerasbn.folding.rewrite import Patch, read_weights, rebuild


@dataclass
class StripResult:
    """The result of `strip_redundant_biases`.

    Attributes:
        model: The new model (``model`` passed in is untouched).
        report: A `StripReport`: the biases removed, parameters before and after.
    """

    model: keras.Model
    report: StripReport


def strip_redundant_biases(model: keras.Model) -> StripResult:
    """A new model without the biases that a following BN makes redundant.

    Each Dense/Conv layer (no activation, called once) whose only reader is a
    plain BN over its channel axis gets ``use_bias=False``; its bias moves into
    the BN's moving mean. Inference outputs are unchanged and the model stays
    trainable. ``kerasbn.audit(model).redundant_biases`` lists the same layers.

    Args:
        model: A Functional or Sequential Keras model (nested models included).

    Returns:
        A `StripResult`: ``.model`` the new model, ``.report`` a `StripReport`.

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` has no functional graph.

    Examples:
        >>> import keras, kerasbn
        >>> x = keras.Input((8,))
        >>> y = keras.layers.BatchNormalization()(keras.layers.Dense(4, name="dense")(x))
        >>> result = kerasbn.strip_redundant_biases(keras.Model(x, y))
        >>> [b.layer for b in result.report.removed], result.model.layers[1].use_bias
        (['dense'], False)
    """
    graph = build_graph(model)
    patches: dict[int, Patch] = {}
    removed = []
    for call, bn in plan.redundant_biases(graph):
        weights = read_weights(call.layer)
        bias = weights.pop("bias")
        patches[id(call.layer)] = Patch({"use_bias": False}, weights)
        bn_weights = read_weights(bn.layer)
        patches[id(bn.layer)] = Patch({}, families.bias_into_mean(bn_weights, np.asarray(bias)))
        removed.append(RedundantBias(call.layer.name, plan.path(call), bn.layer.name, int(bias.size)))
    new = rebuild(model, patches)
    report = StripReport(
        model=model.name,
        removed=removed,
        parameters_before=int(model.count_params()),
        parameters_after=int(new.count_params()),
    )
    return StripResult(new, report)
