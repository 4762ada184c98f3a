"""Each folded layer judged on the activations it receives: the check where the whole model cannot be judged.

A model whose outputs follow a selection (a top-k, an arg-max, NMS: D-FINE's
query selection) is discontinuous: two valid evaluation orders pick other
elements, and no comparison of whole-model outputs can tell a correct fold
from a wrong one. What a fold changes is local, so it is checked locally:

- the folds are the planner's (`kerasbn.folding.audit.decisions` on the
  original), grouped per partner as the chain of layers the original
  applies (``BN → [Flatten →] partner → BN``, either BN optional);
- the chain's input is captured in one inference pass of the original on
  the check inputs (a temporary ``call`` hook on the chain's first layer);
- the original chain, evaluated in float64 (`kerasbn.deploy.twins.layer_twin`),
  is the exact answer; the candidate's chain (the folded partner, and the BN
  where it stays as an exact identity or was rewritten) is judged against it
  by the whole-model check's rule (`kerasbn.deploy.criteria.judge`);
- every other layer must hold exactly the original's weights.

The candidate's layers are matched to the original's in their flattened order
(a BN the rewrite removed, or left as an `Identity` at an output, is skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from kerasbn.deploy import twins
from kerasbn.deploy.criteria import ExactReference, LayerCheck, judge, relative_error
from kerasbn.deploy.tolerances import ROUNDOFF
from kerasbn.errors import UnsupportedModelError
from kerasbn.folding import plan


@dataclass
class _Chain:
    layers: list[keras.layers.Layer]
    partner: keras.layers.Layer
    bns: list[keras.layers.Layer]


def _chains(model: keras.Model) -> list[_Chain]:
    """The original's layers per fold partner, in call order."""
    from kerasbn.folding.audit import decisions

    _, decided = decisions(model)
    parts: dict[int, dict[str, Any]] = {}
    for step in list(decided.removals) + list(decided.in_place):
        entry = parts.setdefault(id(step.partner.layer), {"partner": step.partner.layer})
        if step.direction == plan.BACKWARD:
            entry["after"] = step.bn.layer
        else:
            entry["before"] = step.bn.layer
            entry["flatten"] = step.flatten.layer if step.flatten is not None else None
    chains = []
    for entry in parts.values():
        layers = [entry.get("before"), entry.get("flatten"), entry["partner"], entry.get("after")]
        bns = [entry[k] for k in ("before", "after") if entry.get(k) is not None]
        chains.append(_Chain([la for la in layers if la is not None], entry["partner"], bns))
    return chains


def _flat(model: keras.Model) -> list[keras.layers.Layer]:
    return model._flatten_layers(include_self=False, recursive=True)


def _match(original: keras.Model, candidate: keras.Model) -> dict[int, keras.layers.Layer | None]:
    """``id(original layer)`` → the candidate's layer, ``None`` for a BN the rewrite removed."""
    mine, theirs = _flat(original), _flat(candidate)
    out: dict[int, keras.layers.Layer | None] = {}
    j = 0
    for layer in mine:
        other = theirs[j] if j < len(theirs) else None
        bn = plan.is_bn(layer)
        if other is not None and (
            type(layer) is type(other) or (bn and (plan.is_bn(other) or isinstance(other, keras.layers.Identity)))
        ):
            out[id(layer)] = other
            j += 1
        elif bn:
            out[id(layer)] = None
        else:
            raise UnsupportedModelError(f"the rewritten model's layers do not match the original's at '{layer.name}'")
    if j != len(theirs):
        raise UnsupportedModelError("the rewritten model has layers the original lacks")
    return out


@contextlib.contextmanager
def hooked_calls(layers: Sequence[keras.layers.Layer], hook: Callable[[int, Callable], Callable]) -> Iterator[None]:
    """While the block runs, each layer's ``call`` is ``hook(index, the layer's own call)``."""
    for index, layer in enumerate(layers):
        # An instance attribute shadows the class's method in Layer.__call__;
        # object.__setattr__ keeps Keras's attribute tracking out of it.
        object.__setattr__(layer, "call", hook(index, layer.call))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")


def _recording(layers: Sequence[keras.layers.Layer], captured: dict[int, Any]) -> contextlib.AbstractContextManager:
    """Each layer's first input goes to ``captured[index]`` while the block runs."""

    def hook(index: int, own: Callable) -> Callable:
        def call(inputs, *args, **kwargs):
            captured.setdefault(index, inputs)
            return own(inputs, *args, **kwargs)

        return call

    return hooked_calls(layers, hook)


def _capture(model: keras.Model, layers: Sequence[keras.layers.Layer], inputs: Any) -> list[np.ndarray]:
    """The input each of ``layers`` receives when ``model`` runs inference on ``inputs``."""

    def run(x: Any) -> dict[str, Any]:
        captured: dict[int, Any] = {}
        with _recording(layers, captured):
            model(x, training=False)
        return {str(i): t for i, t in captured.items()}

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Traced, not eager: TensorFlow's CPU kernels have no eager channels_first convolution.
        run = traced_once(tf.function(run, autograph=False))
    try:
        got = run(inputs)
        arrays = [np.asarray(keras.ops.convert_to_numpy(got[str(i)])) for i in range(len(layers))]
    except Exception as exc:  # noqa: BLE001 (any failure means: no capture, so no layer-wise check)
        raise UnsupportedModelError(f"the folded layers' inputs cannot be captured: {exc!s:.120}") from exc
    return arrays


def _evaluate(chains: Sequence[Sequence[keras.layers.Layer]], xs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each chain of layers applied to its input, in one compiled call, as float64 arrays."""

    def run(values: list[Any]) -> list[Any]:
        out = []
        for layers, x in zip(chains, values):
            for layer in layers:
                x = layer(x, training=False)
            out.append(x)
        return out

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        run = traced_once(tf.function(run, autograph=False))
    return [np.asarray(keras.ops.convert_to_numpy(y), np.float64) for y in run(list(xs))]


def traced_once(function: Any) -> Any:
    """A ``tf.function`` traced once by design: TensorFlow would warn about retracing on stderr (a private flag)."""
    function._omit_frequent_tracing_warning = True
    return function


def _cast(xs: Sequence[np.ndarray], dtype: str) -> list[np.ndarray]:
    return [np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else x for x in xs]


def _narrowest(dtypes: Sequence[str]) -> str:
    return max([d for d in dtypes if d in ROUNDOFF] or ["float32"], key=ROUNDOFF.__getitem__)


def _path(layer: keras.layers.Layer) -> str:
    weights = layer.weights
    return "/".join(weights[0].path.split("/")[:-1]) if weights else layer.name


def check(original: keras.Model, candidate: keras.Model, inputs: Any) -> tuple[list[LayerCheck], list[str]]:
    """Judge every folded layer of ``candidate`` on the inputs it receives in ``original`` (module docstring).

    Returns the per-layer checks and the layers outside the folds whose
    weights differ from the original's (there should be none).

    Raises:
        kerasbn.errors.UnsupportedModelError: The candidate's layers cannot
            be matched to the original's, the inputs cannot be captured, or a
            layer has no float64 twin.
    """
    chains = _chains(original)
    matched = _match(original, candidate)
    in_chains = {id(layer) for c in chains for layer in c.layers}
    changed = []
    for layer in _flat(original):
        other = matched[id(layer)]
        if id(layer) in in_chains or other is None or _composite(layer):
            continue
        a, b = layer.weights, other.weights
        if len(a) != len(b) or any(
            tuple(u.shape) != tuple(v.shape)
            or not np.array_equal(keras.ops.convert_to_numpy(u.value), keras.ops.convert_to_numpy(v.value))
            for u, v in zip(a, b)
        ):
            changed.append(_path(layer))
    if not chains:
        return [], changed
    xs = _capture(original, [c.layers[0] for c in chains], inputs)
    theirs = [[matched[id(layer)] for layer in c.layers if matched[id(layer)] is not None] for c in chains]
    mine = [c.layers for c in chains]
    dtypes = [_narrowest([layer.compute_dtype for layer in c]) for c in mine]
    weights = [_narrowest([keras.backend.standardize_dtype(w.dtype) for la in c for w in la.weights]) for c in theirs]
    x64 = _cast(xs, "float64")
    truth = _evaluate([[twins.layer_twin(la, "float64") for la in c] for c in mine], x64)
    own = _evaluate(mine, xs)
    got = _evaluate(theirs, xs)
    got64 = _evaluate([[twins.layer_twin(la, "float64") for la in c] for c in theirs], x64)
    own_in_weights = {}
    for i, (d, w) in enumerate(zip(dtypes, weights)):
        if w != d:
            # A mixed-precision chain's weights are float32: its float64 evaluation
            # is judged by the original chain computing in float32.
            copies = [twins.layer_twin(la, w) for la in mine[i]]
            own_in_weights[i] = _evaluate([copies], _cast([xs[i]], w))[0]
    results = []
    for i, chain in enumerate(chains):
        errors = {dtypes[i]: [relative_error(truth[i], own[i])]}
        if i in own_in_weights:
            errors[weights[i]] = [relative_error(truth[i], own_in_weights[i])]
        result = judge(
            ExactReference(outputs=[truth[i]], own=errors),
            [got[i]],
            dtype=dtypes[i],
            batch_size=len(xs[i]),
            float64=[got64[i]],
            weights_dtype=weights[i],
        )
        results.append(
            LayerCheck(
                layer=_path(chain.partner),
                bns=tuple(_path(bn) for bn in chain.bns),
                passed=result.passed,
                error=relative_error(truth[i], got[i]),
                own_error=errors[dtypes[i]][0],
                float64_error=result.float64_error,
                allowed=result.allowed,
                margin=result.margin,
                dtype=dtypes[i],
            )
        )
    return results, changed


def _composite(layer: keras.layers.Layer) -> bool:
    """A model or layer whose weights are its sublayers' (checked there): nested models and custom blocks."""
    return bool(layer._flatten_layers(include_self=False, recursive=False))
