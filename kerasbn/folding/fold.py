"""`kerasbn.fold`: a new model with every foldable BN merged into its neighbour.

Two ways to carry out a fold. Where the functional graph shows the BN, the
model is rebuilt without it (`kerasbn.folding.rewrite`). Inside a custom layer
or a subclassed model, or when the model cannot be rebuilt from its configs,
the fold rewrites weights in place on a copy of the model: the partner
absorbs the BN and the BN becomes an exact identity (γ = 1, μ = 0 and σ² with
σ² + ε = 1 in the variable's float type, so ``(x − μ)·rsqrt(σ² + ε)·γ`` is
``x`` bit for bit), its β holding the new bias when the partner has none.
Every layer keeps its config, so the model's own classes rebuild it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import keras
import numpy as np

from kerasbn.errors import UnsupportedModelError
from kerasbn.folding import families, plan
from kerasbn.folding.audit import decisions
from kerasbn.folding.graph import Graph, functional_of
from kerasbn.folding.model_checks import check_weights
from kerasbn.folding.reports import FoldReport
from kerasbn.folding.rewrite import Patch, read_weights, rebuild


@dataclass
class FoldResult:
    """The result of `fold`.

    Attributes:
        model: The folded model (a new object; the input model is untouched).
        report: A `FoldReport`.
    """

    model: keras.Model
    report: FoldReport


def _apply(
    step: plan.Plan, bn: keras.layers.Layer, weights: dict[str, np.ndarray], graph: Graph | None
) -> dict[str, np.ndarray]:
    """The partner's ``weights`` with ``step`` folded in, the BN's statistics read from ``bn``."""
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


def identity_variance(epsilon: float, dtype: str) -> np.ndarray:
    """The variance ``v`` closest to ``1 − ε`` with ``v + ε == 1`` exactly in ``dtype``."""
    one = np.asarray(1.0, dtype)
    eps = np.asarray(epsilon, dtype)
    v = np.asarray(one - eps, dtype)
    for _ in range(8):
        total = np.asarray(v + eps, dtype)
        if total == one:
            return v
        v = np.nextafter(v, -np.inf if total > one else np.inf).astype(dtype)
    raise ValueError(f"No variance makes σ² + {epsilon} exactly 1 in {dtype}.")


def _assign(layer: keras.layers.Layer, values: dict[str, np.ndarray]) -> None:
    for w in layer.weights:
        if w.name in values:
            w.assign(np.asarray(values[w.name]).astype(w.dtype))


def fold_in_place(step: plan.Plan, partner: keras.layers.Layer, bn: keras.layers.Layer, graph: Graph | None) -> None:
    """Carry out ``step`` on ``partner`` and ``bn`` (layers of a model copy) by rewriting their weights."""
    new = _apply(step, bn, read_weights(partner), graph)
    bias = new.pop("bias")
    # A renorm BN's training statistics go to the identity too (σ = 1, since
    # σ² + ε = 1), so that training resumes from the folded layer's own
    # output distribution rather than the partner's old one.
    identity = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_stddev": 1.0, "renorm_mean": 0.0}
    identity["renorm_stddev"] = 1.0
    if getattr(families.unwrap(partner), "use_bias", False):
        new["bias"] = bias
    else:
        identity["beta"] = bias
    _assign(partner, new)
    for w in bn.weights:
        value = identity_variance(bn.epsilon, w.dtype) if w.name == "moving_variance" else identity.get(w.name)
        if value is not None:
            w.assign(np.broadcast_to(np.asarray(value).astype(w.dtype), tuple(w.shape)))


def copy_model(model: keras.Model) -> tuple[keras.Model, dict[int, keras.layers.Layer]]:
    """An independent copy of ``model`` and the map ``id(original layer)`` → its copy.

    Keras copies a model by serializing and reloading it (`copy.deepcopy`); where
    that fails, `keras.models.clone_model` re-creates the layers from their
    configs and the weights are copied over.

    Raises:
        kerasbn.errors.UnsupportedModelError: Neither way reproduces the model's layers and weights.
    """
    originals = model._flatten_layers(include_self=False, recursive=True)
    failures = []
    for how in (copy.deepcopy, _clone):
        try:
            new = how(model)
        except Exception as exc:  # noqa: BLE001 (any failure means: try the next way)
            failures.append(next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__))
            continue
        copies = new._flatten_layers(include_self=False, recursive=True)
        if len(copies) == len(originals) and all(
            type(a) is type(b) and [w.shape for w in a.weights] == [w.shape for w in b.weights]
            for a, b in zip(originals, copies)
        ):
            for a, b in zip(originals, copies):
                for src, dst in zip(a.weights, b.weights):
                    dst.assign(src.value)
            return new, {id(a): b for a, b in zip(originals, copies)}
        failures.append("the copy has different layers or weights")
    raise UnsupportedModelError(
        f"Model '{model.name}' ({type(model).__name__}) cannot be copied to fold it: {failures[-1]}"
    )


def _clone(model: keras.Model) -> keras.Model:
    new = keras.models.clone_model(model)
    if not new.built:
        new.build(next(iter(model._build_shapes_dict.values())))
    return new


def fold(model: keras.Model) -> FoldResult:
    """Fold every BatchNormalization layer that can be folded exactly.

    A BN after a Dense/Conv/DepthwiseConv/SeparableConv/ConvTranspose layer
    (no activation, no other reader, BN over the channel axis) is folded
    backward into it; otherwise a BN before a Dense layer, a Conv/Depthwise/
    Separable conv without zero padding, or Flatten → Dense is folded forward.
    Any other BN stays and is reported with its reason. Weights are computed
    in float64 and cast to each variable's dtype; a partner without a bias
    gains one.

    BN layers inside custom layers and subclassed models are found by tracing
    the model (`kerasbn.folding.dataflow`) and folded in place; so are all
    folds when the model cannot be rebuilt from its layers' configs (the
    report's ``method`` and ``notes`` say so).

    Args:
        model: A Keras model: Functional, Sequential (nested, multi-input and
            multi-output included) or subclassed.

    Returns:
        A `FoldResult`: ``.model`` the new model, ``.report`` a `FoldReport`.

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` is unbuilt, or a fold is
            needed in place and the model cannot be copied.
        kerasbn.errors.KerasbnError: a weight holds NaN or infinite values, or a
            BN variance is negative (`kerasbn.folding.model_checks`).

    Examples:
        >>> import keras, kerasbn
        >>> x = keras.Input((8, 8, 3))
        >>> y = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
        >>> result = kerasbn.fold(keras.Model(x, y))
        >>> [type(l).__name__ for l in result.model.layers]
        ['InputLayer', 'Conv2D', 'Identity']
    """
    check_weights(model)
    graph, decided = decisions(model)
    removals, in_place = list(decided.removals), list(decided.in_place)
    notes: list[str] = []
    new = None
    if functional_of(model) is not None and (removals or not in_place):
        # Rebuilt without the removed BN layers; the in-place folds then go
        # into the rebuilt model's own copies of their layers.
        copies: dict[int, keras.layers.Layer] = {}
        try:
            new = rebuild(model, *_removal_changes(removals, graph, {}), copies=copies)
            _check_reloads(new)
        except UnsupportedModelError as exc:
            new = None
            notes.append(f"{exc} Folded in place instead.")
        else:
            needed = [id(s.partner.layer) for s in in_place] + [id(s.bn.layer) for s in in_place]
            if all(key in copies for key in needed):
                for step in in_place:
                    fold_in_place(step, copies[id(step.partner.layer)], copies[id(step.bn.layer)], graph)
            else:
                new = None
                notes.append("The rebuilt model's custom layers do not match the original's. Folded in place instead.")
    if new is None:
        # A copy that keeps the model's own class (and everything its layers hold).
        new, copies = copy_model(model)
        in_place, removals = in_place + _feasible(removals), []
        for step in in_place:
            fold_in_place(step, copies[id(step.partner.layer)], copies[id(step.bn.layer)], graph)
    findings = _how(decided, removals, in_place)
    folded = [f for f in findings if f.foldable]
    hows = {f.how for f in folded}
    method = "none" if not hows else (hows.pop() if len(hows) == 1 else "mixed")
    report = FoldReport(
        model=model.name,
        folded=folded,
        not_folded=[f for f in findings if not f.foldable],
        parameters_before=int(model.count_params()),
        parameters_after=int(new.count_params()),
        method=method,
        notes=notes,
    )
    return FoldResult(new, report)


def _check_reloads(model: keras.Model) -> None:
    """Raise `UnsupportedModelError` unless ``model``'s config (as JSON) re-creates it.

    The rebuilt model is a plain Functional model; custom layers inside it
    (keras-hub blocks) are then re-created from their own configs and built
    from a JSON ``build_config``, which some of them do not survive. Built-in
    Keras layers always do, so only a model with custom layers is checked.
    """
    custom = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not type(layer).__module__.startswith("keras.")
    ]
    if not custom:
        return
    try:
        keras.models.model_from_json(model.to_json())
    except Exception as exc:  # noqa: BLE001 (any failure means: the file would not load)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UnsupportedModelError(f"The rebuilt model would not reload from its config: {first}") from exc


def _removal_changes(
    removals: list[plan.Plan], graph: Graph, copies: dict[int, keras.layers.Layer]
) -> tuple[dict[int, Patch], set[int]]:
    """Patches and removed layers for `rebuild`, keyed by the layers of the model copy (or the originals)."""

    def own(layer):
        return copies.get(id(layer), layer)

    work: dict[int, dict[str, np.ndarray]] = {}
    for step in removals:
        layer = own(step.partner.layer)
        weights = work.get(id(layer))
        if weights is None:
            weights = read_weights(layer)
        # Folds into one layer from both sides compose: each only rescales
        # its own kernel axis and maps the bias affinely. The BN's statistics
        # are the original's (a BN folded in place is never removed).
        work[id(layer)] = _apply(step, own(step.bn.layer), weights, graph)
    patches = {key: Patch({"use_bias": True}, weights) for key, weights in work.items()}
    removed = {id(own(step.bn.layer)) for step in removals}
    return patches, removed


def _feasible(steps: list[plan.Plan]) -> list[plan.Plan]:
    """The folds of ``steps`` that can be done in place (the others stay, reported by `_how`)."""
    return [step for step in steps if plan.in_place_refusal(step) is None]


def _how(decided: plan.Decisions, removals: list[plan.Plan], in_place: list[plan.Plan]) -> list:
    """The findings with ``how`` set from the folds done (a removal may have become in place, or failed to)."""
    removed = {id(s.bn.layer) for s in removals}
    inplace = {id(s.bn.layer) for s in in_place}
    out = []
    for bn, f in zip(decided.bns, decided.findings):
        if not f.foldable or id(bn) in removed:
            out.append(f)
        elif id(bn) in inplace:
            out.append(dataclasses.replace(f, how=plan.IN_PLACE))
        else:
            out.append(
                dataclasses.replace(
                    f,
                    foldable=False,
                    direction=None,
                    how=None,
                    code=plan.Reason.NO_BIAS_SLOT,
                    reason=f"the model cannot be rebuilt and '{f.partner}' has no bias to take the folded shift",
                )
            )
    return out
