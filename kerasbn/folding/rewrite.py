"""Build a new Keras model from an old one with some layers changed, removed or inserted.

The graph is replayed node by node on fresh `keras.Input` tensors with a
clone of every layer (so the result shares no variable with the original),
which keeps layer names, input names, the call arguments of every node,
shared layers (one clone per layer, called as often as the original) and
nested models (rebuilt recursively, a Sequential as a Sequential).
`keras.models.clone_model` is not used: it passes ``mask=`` to replacement
layers, which layers such as `keras.layers.Identity` reject.

A removed layer's output is its input, except where that output is an output
of its model: there an `Identity` with the removed layer's name keeps the
model's output names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from kerasbn.errors import UnsupportedModelError
from kerasbn.folding.graph import check_model, functional_of, nodes_in_order


@dataclass
class Patch:
    """A change to one layer.

    Attributes:
        config: Entries that override the layer's config (e.g. ``{"use_bias": True}``).
        weights: New values by short weight name (``"kernel"``, ``"bias"``, ``"moving_mean"``…);
            cast to each variable's dtype. Weights not named keep their values.
    """

    config: dict = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)


# Makes a replacement layer from the original's config (`rebuild`'s ``replace``).
Replacement = Callable[[dict], keras.layers.Layer]
# Makes a new layer to call on an output of the given layer (`rebuild`'s ``after``).
Insertion = Callable[[keras.layers.Layer], keras.layers.Layer]


def read_weights(layer: keras.layers.Layer) -> dict[str, np.ndarray]:
    """A layer's weights by short name, as float64 arrays."""
    return {w.name: np.asarray(keras.ops.convert_to_numpy(w.value), np.float64) for w in layer.weights}


class _Rebuilder:
    def __init__(
        self,
        patches: dict[int, Patch],
        removed: set[int],
        replace: dict[int, Replacement] | None = None,
        after: dict[int, Insertion] | None = None,
    ):
        self.patches = patches
        self.removed = removed
        self.replace = replace or {}
        self.after = after or {}
        self.clones: dict[int, keras.layers.Layer] = {}
        self.pending: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone(self, layer: keras.layers.Layer) -> keras.layers.Layer:
        # One clone per layer, so a shared layer stays shared.
        new = self.clones.get(id(layer))
        if new is not None:
            return new
        if functional_of(layer) is not None:
            new = self.model(layer)
        elif not isinstance(layer, keras.layers.Layer):
            # A bare operation recorded from tensor arithmetic (``x + 3``):
            # stateless, so the new graph can call the same object.
            new = layer
        else:
            patch = self.patches.get(id(layer))
            try:
                config = layer.get_config()
                if patch is not None:
                    _override(layer, config, patch.config)
                factory = self.replace.get(id(layer))
                new = type(layer).from_config(config) if factory is None else factory(config)
            except Exception as exc:  # noqa: BLE001 (any failure means: not rebuildable)
                first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                raise UnsupportedModelError(
                    f"Layer '{layer.name}' ({type(layer).__name__}) cannot be re-created from its config: {first}"
                ) from exc
            self.pending.append((layer, new))
        self.clones[id(layer)] = new
        return new

    def model(self, model: keras.Model) -> keras.Model:
        fn = check_model(model)
        if isinstance(model, keras.Sequential):
            new = self._sequential(model, fn)
        else:
            new = self._functional(model, fn)
        new.trainable = model.trainable
        return new

    def _stand_in(self, layer: keras.layers.Layer) -> keras.layers.Layer:
        return keras.layers.Identity(name=layer.name, dtype=layer.get_config().get("dtype"))

    def _sequential(self, model: keras.Sequential, fn) -> keras.Sequential:
        first = model._layers[0]
        layers = [type(first).from_config(first.get_config())]
        if id(first) in self.after:
            layers.append(self.after[id(first)](first))
        body = model.layers
        for i, layer in enumerate(body):
            if id(layer) in self.removed:
                if i == len(body) - 1:
                    layers.append(self._stand_in(layer))
                continue
            layers.append(self.clone(layer))
            if id(layer) in self.after:
                layers.append(self.after[id(layer)](layer))
        return keras.Sequential(layers, name=model.name)

    def _insert(self, layer: keras.layers.Layer, result):
        """``result`` (the outputs of a call of ``layer``) through the layers inserted after it."""
        make = self.after.get(id(layer))
        if make is None:
            return result
        return keras.tree.map_structure(lambda t: make(layer)(t), result)

    def _functional(self, model: keras.Model, fn) -> keras.Model:
        tensors: dict[int, object] = {}
        new_inputs = []
        for kt in fn.inputs:
            input_layer = kt._keras_history.operation
            new = type(input_layer).from_config(input_layer.get_config()).output
            # The tensor name (not only the InputLayer's) is what exporters
            # such as tf2onnx call the graph input.
            new.name = kt.name
            tensors[id(kt)] = self._insert(input_layer, new)
            new_inputs.append(new)
        outputs = {id(kt) for kt in fn.outputs}
        for node in nodes_in_order(fn):
            args, kwargs = node.arguments.fill_in(tensors)
            layer = node.operation
            if id(layer) in self.removed:
                (x,) = node.arguments.keras_tensors
                result = tensors[id(x)]
                if id(node.outputs[0]) in outputs:
                    result = self._stand_in(layer)(result)
            else:
                result = self._insert(layer, self.clone(layer)(*args, **kwargs))
            for kt, value in zip(node.outputs, keras.tree.flatten(result)):
                tensors[id(kt)] = value
        inputs = keras.tree.pack_sequence_as(fn._inputs_struct, new_inputs)
        outs = keras.tree.pack_sequence_as(fn._outputs_struct, [tensors[id(kt)] for kt in fn.outputs])
        return keras.Model(inputs=inputs, outputs=outs, name=model.name)

    def copy_weights(self) -> None:
        for old, new in self.pending:
            patch = self.patches.get(id(old))
            if patch is None and id(old) not in self.replace:
                if len(old.weights) != len(new.weights):
                    raise UnsupportedModelError(
                        f"Layer '{old.name}' was re-created with {len(new.weights)} weights instead of {len(old.weights)}."
                    )
                for src, dst in zip(old.weights, new.weights):
                    dst.assign(_own_copy(src))
                continue
            # Patched and replacing layers get their weights by name.
            by_name = {w.name: w for w in old.weights}
            values = patch.weights if patch is not None else {}
            for dst in new.weights:
                if dst.name in values:
                    dst.assign(np.asarray(values[dst.name]).astype(dst.dtype))
                elif dst.name in by_name:
                    dst.assign(_own_copy(by_name[dst.name]))
                # Else a weight the replacement adds (a counter, a range) keeps its initial value.


def _override(layer: keras.layers.Layer, config: dict, changes: dict) -> None:
    """``config`` (of ``layer``) with ``changes``; a `TimeDistributed`'s go to the layer it wraps, whose
    config (``use_bias``...) they are about."""
    while isinstance(layer, keras.layers.TimeDistributed):
        layer, config = layer.layer, config["layer"]["config"]
    config.update(changes)


def _own_copy(variable: keras.Variable) -> np.ndarray:
    """The variable's value as a new host array: on JAX, assigning ``.value`` itself would
    share one device buffer between the two models, and a training step that donates it
    for one model deletes it under the other."""
    return np.array(keras.ops.convert_to_numpy(variable.value))


def rebuild(
    model: keras.Model,
    patches: dict[int, Patch] | None = None,
    removed: set[int] | None = None,
    replace: dict[int, Replacement] | None = None,
    copies: dict[int, keras.layers.Layer] | None = None,
    after: dict[int, Insertion] | None = None,
) -> keras.Model:
    """A new model equal to ``model`` except for the given changes.

    Args:
        model: A Functional or Sequential model (nested models allowed).
        patches: ``id(layer)`` → `Patch` for layers to re-create with new config/weights.
        removed: ``id(layer)`` of single-input layers to drop (their output becomes their input).
        replace: ``id(layer)`` → a function that makes the layer's replacement from its
            (patched) config, e.g. another class; weights are copied by name.
        after: ``id(layer)`` → a function that makes a new layer for each output of
            each call of ``layer`` (an `InputLayer` included), inserted there.
        copies: If given, filled with ``id(old layer)`` → its new layer, for every
            re-created layer and the sublayers of custom layers (matched in order).

    Returns:
        The new model; ``model`` is not modified and shares no variable with it.
    """
    builder = _Rebuilder(patches or {}, removed or set(), replace, after)
    new = builder.model(model)
    builder.copy_weights()
    if copies is not None:
        for old, clone in builder.pending:
            copies[id(old)] = clone
            inner_old = old._flatten_layers(include_self=False, recursive=True)
            inner_new = clone._flatten_layers(include_self=False, recursive=True)
            if len(inner_old) == len(inner_new):
                copies.update({id(a): b for a, b in zip(inner_old, inner_new) if type(a) is type(b)})
    return new
