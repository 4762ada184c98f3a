"""`kerasbn.fold`: a new model with every foldable BN merged into its neighbour."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import keras
import numpy as np

from kerasbn import kernels, rules
from kerasbn.audit import BNFinding, analyse
from kerasbn.graph import build_graph
from kerasbn.rewrite import Patch, read_weights, rebuild
from kerasbn.tables import bn_rows, render, table


@dataclass
class FoldReport:
    """What `fold` did.

    Attributes:
        model: The model's name.
        folded: `BNFinding` of each BN that was folded (``partner``, ``direction``).
        not_folded: `BNFinding` of each BN that stays, with ``reason`` and ``code``.
        parameters_before: Weight count of the original model.
        parameters_after: Weight count of the folded model.
    """

    model: str
    folded: list[BNFinding] = field(default_factory=list)
    not_folded: list[BNFinding] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``model``, ``totals``, ``folded``, ``not_folded``."""
        return {
            "model": self.model,
            "totals": {
                "bn_layers": len(self.folded) + len(self.not_folded),
                "folded": len(self.folded),
                "not_folded": len(self.not_folded),
                "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after,
                "parameters_saved": self.parameters_before - self.parameters_after,
            },
            "folded": [asdict(f) for f in self.folded],
            "not_folded": [asdict(f) for f in self.not_folded],
        }

    def __rich__(self):
        n = len(self.folded) + len(self.not_folded)
        caption = (
            f"{len(self.folded)}/{n} BN layers folded; parameters {self.parameters_before:,} → "
            f"{self.parameters_after:,}"
        )
        return table(
            f"Fold of '{self.model}'",
            ["BN", "partner", "direction", "folded", "reason"],
            bn_rows(self.folded + self.not_folded),
            caption,
        )

    def __str__(self) -> str:
        return render(self)


@dataclass
class FoldResult:
    """The result of `fold`.

    Attributes:
        model: The folded model (a new object; the input model is untouched).
        report: A `FoldReport`.
    """

    model: keras.Model
    report: FoldReport


def _apply(plan: rules.Plan, weights: dict[str, np.ndarray], graph) -> dict[str, np.ndarray]:
    bn = plan.bn.layer
    s, t = kernels.bn_affine(read_weights(bn), bn.epsilon)
    k = rules.kind(plan.partner.layer)
    if plan.direction == rules.BACKWARD:
        return kernels.backward(k, weights, s, t)
    if plan.flatten is not None:
        shape = graph.shapes[plan.bn.inputs[0]]
        axis = rules.bn_axes(bn, len(shape))[0]
        channels_first = getattr(plan.flatten.layer, "data_format", "channels_last") == "channels_first"
        s = kernels.tile_for_flatten(s, shape[1:], axis, channels_first)
        t = kernels.tile_for_flatten(t, shape[1:], axis, channels_first)
    return kernels.forward(k, weights, s, t)


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
    findings, plans = analyse(graph)
    work: dict[int, dict[str, np.ndarray]] = {}
    for plan in plans:
        layer = plan.partner.layer
        weights = work.get(id(layer))
        if weights is None:
            weights = read_weights(layer)
        # Folds into one layer from both sides compose: each only rescales
        # its own kernel axis and maps the bias affinely.
        work[id(layer)] = _apply(plan, weights, graph)
    patches = {
        id(plan.partner.layer): Patch({"use_bias": True}, work[id(plan.partner.layer)]) for plan in plans
    }
    removed = {id(plan.bn.layer) for plan in plans}
    new = rebuild(model, patches, removed)
    report = FoldReport(
        model.name,
        [f for f in findings if f.foldable],
        [f for f in findings if not f.foldable],
        int(model.count_params()),
        int(new.count_params()),
    )
    return FoldResult(new, report)
