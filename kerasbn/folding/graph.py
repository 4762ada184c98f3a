"""A read-only view of a Keras functional model as a flat graph of layer calls.

Nested models (a Functional or Sequential model used as a layer) are
flattened: their calls appear in the same list as the outer model's, and a
tensor that crosses a model boundary has one identity on both sides, so the
producer and the consumers of every tensor are known across nesting levels.
A nested model called twice contributes its calls twice, which is how a
layer inside it shows up as shared.

This module and `kerasbn.folding.rewrite` are the only places that read Keras's
private node API (``_nodes_by_depth``, ``Node.arguments``): Keras changes it
between minor releases, and one small module is easy to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
from keras.src.models.functional import Functional

from kerasbn.errors import UnsupportedModelError
from kerasbn.model_signature import functional_of

_SUPPORTED = "a Functional or Sequential Keras model (nested models allowed)"


@dataclass(frozen=True, eq=False)
class Call:
    """One call of a (non-model) layer in the flattened graph.

    Attributes:
        index: Position in topological order.
        layer: The Keras layer that is called.
        scope: Names of the enclosing models, outermost first (the outer model
            itself excluded), e.g. ``("encoder",)`` for a layer of a nested model.
        inputs: Tensor ids of the call's input tensors, in argument order.
        outputs: Tensor ids of the call's output tensors.
    """

    index: int
    layer: keras.layers.Layer
    scope: tuple[str, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Op:
    """A traced operation outside any layer the fold engine knows (a stand-in for a layer).

    `kerasbn.folding.dataflow` makes one for every traced op it cannot tie to such a layer.

    Attributes:
        name: The TensorFlow op name (its name scopes show where it comes from).
        type: The TensorFlow op type (``Relu``, ``AddV2``…).
    """

    name: str
    type: str


@dataclass
class Graph:
    """The flattened call graph of a model.

    Attributes:
        calls: Every layer call, in topological order.
        shapes: Static shape of every tensor id.
        dtypes: Dtype of every tensor id, as Keras declares it.
        producer: Tensor id → the call that produces it (absent for model inputs).
        consumers: Tensor id → the calls that read it (each call once).
        outputs: Tensor ids that are outputs of the outer model.
        scope_outputs: Tensor ids that are outputs of any model, nested ones included.
        unscoped: ``id(layer)`` of layers whose variables a trace saw read outside
            the layer's own call (`kerasbn.folding.dataflow`), so it has no calls here.
    """

    calls: list[Call] = field(default_factory=list)
    shapes: dict[int, tuple] = field(default_factory=dict)
    dtypes: dict[int, str] = field(default_factory=dict)
    producer: dict[int, Call] = field(default_factory=dict)
    consumers: dict[int, list[Call]] = field(default_factory=dict)
    outputs: set[int] = field(default_factory=set)
    scope_outputs: set[int] = field(default_factory=set)
    unscoped: set[int] = field(default_factory=set)
    _calls_by_layer: dict[int, list[Call]] = field(default_factory=dict)

    def calls_of(self, layer: keras.layers.Layer) -> list[Call]:
        """All calls of ``layer`` (more than one for a shared layer)."""
        return self._calls_by_layer.get(id(layer), [])

    def consumers_of(self, tensor: int) -> list[Call]:
        """The calls that read ``tensor``."""
        return self.consumers.get(tensor, [])

    def n_readers(self, tensor: int) -> int:
        """Consumers of ``tensor``, counting being a model output as one more."""
        return len(self.consumers_of(tensor)) + (tensor in self.outputs)


def check_model(model: object) -> Functional:
    """Return the functional graph of ``model`` or raise `UnsupportedModelError`."""
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"Expected a Keras model, got {type(model).__name__}; kerasbn needs {_SUPPORTED}.")
    functional = functional_of(model)
    if functional is None:
        if isinstance(model, keras.Sequential):
            raise UnsupportedModelError(
                f"Sequential model '{model.name}' has no input shape yet; build it (or start it with keras.Input) first."
            )
        raise UnsupportedModelError(
            f"Model '{model.name}' ({type(model).__name__}) is subclassed and has no functional graph; "
            f"kerasbn needs {_SUPPORTED}."
        )
    return functional


def input_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The `InputLayer` of each input of ``model`` (a Functional or built Sequential), in input order."""
    return [kt._keras_history.operation for kt in keras.tree.flatten(check_model(model).inputs)]


def nodes_in_order(functional: Functional) -> list:
    """The non-input nodes of a functional model in topological order."""
    order = []
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                order.append(node)
    return order


def build_graph(model: keras.Model) -> Graph:
    """Flatten ``model`` into a `Graph`.

    A subclassed model has no functional graph: its graph is empty (its layer
    calls are only known from a trace, `kerasbn.folding.dataflow`).

    Raises:
        kerasbn.errors.UnsupportedModelError: ``model`` is no Keras model, or an unbuilt Sequential.
    """
    if isinstance(model, keras.Model) and not isinstance(model, keras.Sequential) and functional_of(model) is None:
        return Graph()
    functional = check_model(model)
    graph = Graph()
    ids: dict[tuple, int] = {}

    def new_id(kt) -> int:
        tid = len(graph.shapes)
        graph.shapes[tid] = tuple(kt.shape)
        graph.dtypes[tid] = kt.dtype
        return tid

    def visit(fn: Functional, scope: tuple[str, ...], key: tuple, input_ids: list[int]) -> list[int]:
        # `key` tells apart two calls of the same nested model, whose inner
        # KerasTensors are the same Python objects.
        for kt, tid in zip(fn.inputs, input_ids):
            ids[key + (id(kt),)] = tid
        for node in nodes_in_order(fn):
            inputs = [ids[key + (id(kt),)] for kt in node.input_tensors]
            layer = node.operation
            inner = functional_of(layer)
            if inner is not None:
                # A nested model: its calls join this graph under a fresh key.
                sub_key = key + (len(graph.calls), id(node))
                outs = visit(inner, scope + (layer.name,), sub_key, inputs)
                graph.scope_outputs.update(outs)
            else:
                outs = [new_id(kt) for kt in node.outputs]
                call = Call(index=len(graph.calls), layer=layer, scope=scope, inputs=tuple(inputs), outputs=tuple(outs))
                graph.calls.append(call)
                graph._calls_by_layer.setdefault(id(layer), []).append(call)
                for tid in outs:
                    graph.producer[tid] = call
                for tid in dict.fromkeys(inputs):
                    graph.consumers.setdefault(tid, []).append(call)
            for kt, tid in zip(node.outputs, outs):
                ids[key + (id(kt),)] = tid
        return [ids[key + (id(kt),)] for kt in fn.outputs]

    top_inputs = [new_id(kt) for kt in functional.inputs]
    outs = visit(functional, (), (), top_inputs)
    graph.outputs.update(outs)
    graph.scope_outputs.update(outs)
    return graph
