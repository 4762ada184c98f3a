"""`kerasbn.fold`: a new model with every foldable BN merged into its neighbour."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from kerasbn.folding import families, plan
from kerasbn.folding.graph import Graph, build_graph
from kerasbn.folding.rewrite import Patch, read_weights, rebuild
from kerasbn.report import FoldReport


@dataclass
class FoldResult:
    """The result of `fold`.

    Attributes:
        model: The folded model (a new object; the input model is untouched).
        report: A `FoldReport`.
    """

    model: keras.Model
    report: FoldReport


def _apply(step: plan.Plan, weights: dict[str, np.ndarray], graph: Graph) -> dict[str, np.ndarray]:
    bn = step.bn.layer
    s, t = families.bn_affine(read_weights(bn), bn.epsilon)
    family = families.family_of(step.partner.layer)
    if step.direction == plan.BACKWARD:
        return family.backward(weights, s, t)
    if step.flatten is not None:
        shape = graph.shapes[step.bn.inputs[0]]
        axis = plan.bn_axes(bn, len(shape))[0]
        channels_first = getattr(step.flatten.layer, "data_format", "channels_last") == "channels_first"
        s = families.tile_for_flatten(s, shape[1:], axis, channels_first)
        t = families.tile_for_flatten(t, shape[1:], axis, channels_first)
    return family.forward(weights, s, t)


def fold(model: keras.Model) -> FoldResult:
    """Fold every BatchNormalization layer that can be folded exactly.

    A BN after a Dense/Conv/DepthwiseConv/SeparableConv/ConvTranspose layer
    (no activation, no other reader, BN over the channel axis) is folded
    backward into it; otherwise a BN before a Dense layer, a Conv/Depthwise/
    Separable conv without zero padding, or Flatten → Dense is folded forward.
    Any other BN stays and is reported with its reason. Weights are computed
    in float64 and cast to each variable's dtype; a partner without a bias
    gains one.

    Args:
        model: A Functional or Sequential Keras model (nested, multi-input and
            multi-output models included).

    Returns:
        A `FoldResult`: ``.model`` the new model, ``.report`` a `FoldReport`.

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` has no functional graph
            or a layer cannot be re-created from its config.

    Example:

    >>> import keras, kerasbn
    >>> x = keras.Input((8, 8, 3))
    >>> y = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
    >>> result = kerasbn.fold(keras.Model(x, y))
    >>> [type(l).__name__ for l in result.model.layers]
    ['InputLayer', 'Conv2D', 'Identity']
    """
    graph = build_graph(model)
    findings, plans = plan.analyse(graph)
    work: dict[int, dict[str, np.ndarray]] = {}
    for step in plans:
        layer = step.partner.layer
        weights = work.get(id(layer))
        if weights is None:
            weights = read_weights(layer)
        # Folds into one layer from both sides compose: each only rescales
        # its own kernel axis and maps the bias affinely.
        work[id(layer)] = _apply(step, weights, graph)
    patches = {id(step.partner.layer): Patch({"use_bias": True}, work[id(step.partner.layer)]) for step in plans}
    removed = {id(step.bn.layer) for step in plans}
    new = rebuild(model, patches, removed)
    report = FoldReport(
        model.name,
        [f for f in findings if f.foldable],
        [f for f in findings if not f.foldable],
        int(model.count_params()),
        int(new.count_params()),
    )
    return FoldResult(new, report)
