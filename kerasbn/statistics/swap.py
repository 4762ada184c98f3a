"""`kerasbn.swap`: exchange Keras's BatchNormalization and kerasbn's in an existing model.

kerasbn's layer is a drop-in: its constructor is a superset of Keras's and
its weights have the same names and shapes. So a swap re-creates each BN from
its config as the other class and copies the weights by name, bit for bit;
inference outputs do not change. Swapping to kerasbn records
``unbiased=False`` unless asked otherwise: that is what Keras's layer does
(its moving variance tracks the biased σ²_B), so training behaves the same
and the round trip Keras → kerasbn → Keras gives back the same layers.

Going back to Keras, a kerasbn layer whose settings Keras cannot hold
(``momentum=None``, ``virtual_batch_size``, several feature axes) stays
kerasbn and is reported; ``unbiased=True`` is dropped with a note (inference
is the same; further training would track Keras's biased variance).

BNs in Functional and Sequential models, nested ones included, are swapped
by rebuilding the graph (`kerasbn.folding.rewrite.rebuild`). A BN held as an
attribute of a custom layer is swapped in the rebuilt layer's attribute; such
a swap holds in memory, but a saved file re-creates whatever BN the custom
layer's own code makes, which `SwapReport.inside_custom` lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from kerasbn.errors import KerasbnError
from kerasbn.folding import plan
from kerasbn.folding.graph import check_model, functional_of
from kerasbn.folding.rewrite import rebuild
from kerasbn.layers.batch_normalization import BatchNormalization as KerasbnBN
from kerasbn.statistics.collect import find_batch_norms
from kerasbn.statistics.reports import SwapReport

TARGETS = ("kerasbn", "keras")
_KERASBN_ONLY = ("unbiased", "virtual_batch_size")


@dataclass
class SwapResult:
    """The output of `kerasbn.swap`.

    Attributes:
        model: The new model (the input is not modified).
        report: A `SwapReport`: which BNs were swapped, which stayed and why.
    """

    model: keras.Model
    report: SwapReport


def is_kerasbn(layer: object) -> bool:
    return isinstance(layer, KerasbnBN)


def _source(layer: object, to: str) -> bool:
    """Whether ``layer`` is a BN of the class being swapped away."""
    return plan.is_bn(layer) and (is_kerasbn(layer) != (to == "kerasbn"))


def _obstacle(layer: keras.layers.Layer, to: str) -> str | None:
    """Why ``layer`` cannot become the other class, or ``None``."""
    if to == "kerasbn":
        return None
    if layer.momentum is None:
        return "momentum=None (the exact cumulative average) has no Keras equivalent"
    if layer.virtual_batch_size is not None:
        return "virtual_batch_size (ghost batches) has no Keras equivalent"
    if isinstance(layer.axis, list) and len(layer.axis) > 1:
        return "several feature axes; Keras's layer takes one"
    return None


def _converter(to: str, unbiased: bool):
    def convert(config: dict) -> keras.layers.Layer:
        config = dict(config)
        if to == "kerasbn":
            config["unbiased"] = unbiased
            return KerasbnBN.from_config(config)
        for key in _KERASBN_ONLY:
            config.pop(key, None)
        if isinstance(config.get("axis"), list):
            config["axis"] = config["axis"][0]
        return keras.layers.BatchNormalization.from_config(config)

    return convert


def swap(model: keras.Model, to: str = "kerasbn", *, unbiased: bool = False) -> SwapResult:
    """Replace every BN of ``model`` by the other implementation, weights and settings kept.

    Args:
        model: A Functional or Sequential Keras model (nested models and BNs
            inside custom layers included).
        to: ``"kerasbn"`` (Keras's BN → `kerasbn.BatchNormalization`) or ``"keras"`` (back).
        unbiased: For ``to="kerasbn"``: the new layers' ``unbiased`` setting.
            ``False`` (default) keeps Keras's training behaviour exactly;
            ``True`` gives the paper's unbiased moving variance.

    Returns:
        A `SwapResult`; outputs in inference are the same as ``model``'s.

    Raises:
        kerasbn.errors.KerasbnError: ``to`` is not ``"kerasbn"`` or ``"keras"``.
        kerasbn.errors.UnsupportedModelError: ``model`` has no functional graph.

    Examples:
        >>> import keras, kerasbn
        >>> x = keras.Input((4,))
        >>> model = keras.Model(x, keras.layers.BatchNormalization()(keras.layers.Dense(3)(x)))
        >>> type(kerasbn.swap(model).model.layers[-1]).__module__
        'kerasbn.layers.batch_normalization'
    """
    if to not in TARGETS:
        raise KerasbnError(f"unknown swap target '{to}'; choose one of {', '.join(TARGETS)}")
    check_model(model)
    convert = _converter(to, unbiased)
    swapped, stayed, notes = [], [], []
    replace = {}
    for site in find_batch_norms(model):
        if not _source(site.layer, to):
            continue
        reason = _obstacle(site.layer, to)
        if reason is not None:
            stayed.append((site.path, reason))
            continue
        replace[id(site.layer)] = convert
        if to == "keras" and site.layer.unbiased:
            notes.append(f"{site.path}: unbiased=True dropped (Keras's moving variance is biased)")
    new = rebuild(model, replace=replace)
    inside_custom = _swap_attributes(new, to, convert, stayed, notes)
    for site in find_batch_norms(new):
        if plan.is_bn(site.layer) and not _source(site.layer, to) and site.path not in {p for p, _ in stayed}:
            swapped.append(site.path)
    # A BN that is still of the old class and not explained above stayed for a reason the walk could not see.
    explained = {p for p, _ in stayed}
    for site in find_batch_norms(new):
        if _source(site.layer, to) and site.path not in explained:
            stayed.append((site.path, "held by a custom layer in a way kerasbn cannot replace (e.g. in a list)"))
    report = SwapReport(
        model=model.name,
        to=to,
        swapped=swapped,
        stayed=stayed,
        inside_custom=inside_custom,
        notes=notes,
        parameters=int(model.count_params()),
    )
    return SwapResult(new, report)


def _swap_attributes(model: keras.Model, to: str, convert, stayed: list, notes: list) -> list[str]:
    """Swap BNs held as attributes of custom (non-graph) layers of the rebuilt model; returns their paths."""
    done = []
    owners = [model] + list(model._flatten_layers(include_self=False, recursive=True))
    for owner in owners:
        if functional_of(owner) is not None or plan.is_bn(owner):
            continue  # graph models were rebuilt; a BN has no BN inside
        for attribute, value in list(vars(owner).items()):
            if attribute.startswith("_") or not _source(value, to):
                continue
            path = next((s.path for s in find_batch_norms(model) if s.layer is value), value.name)
            reason = _obstacle(value, to)
            if reason is not None:
                stayed.append((path, reason))
                continue
            new = convert(value.get_config())
            if value.built:
                rank = value.input_spec.ndim if value.input_spec is not None else None
                if rank is None:
                    stayed.append((path, "the layer's input rank is unknown"))
                    continue
                axes = plan.bn_axes(value, rank)
                sizes = dict(zip(axes, np.shape(keras.ops.convert_to_numpy(value.moving_mean))))
                new.build(tuple(sizes.get(a) for a in range(rank)))
                by_name = {w.name: w for w in value.weights}
                for w in new.weights:
                    w.assign(np.array(keras.ops.convert_to_numpy(by_name[w.name].value)))  # no shared buffer
            index = next(i for i, layer in enumerate(owner._layers) if layer is value)
            # Bypass Keras's tracking (it would append the new layer after the old one)
            # and put the new layer in the old one's place, so the weight order is kept.
            object.__setattr__(owner, attribute, new)
            owner._layers[index] = new
            if to == "keras" and getattr(value, "unbiased", False):
                notes.append(f"{path}: unbiased=True dropped (Keras's moving variance is biased)")
            done.append(path)
    return done
