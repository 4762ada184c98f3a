"""kerasbn.graph: the flattened view of nested, shared and multi-input models."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasbn.errors import UnsupportedModelError
from kerasbn.folding.graph import build_graph

L = keras.layers


def test_nested_model_tensors_cross_the_boundary():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, L.Dense(3, name="inner_dense")(inner_in), name="inner")
    x = keras.Input((4,))
    y = L.BatchNormalization(name="bn")(inner(x))
    graph = build_graph(keras.Model(x, y))
    dense, bn = graph.calls
    assert dense.scope == ("inner",) and bn.scope == ()
    assert graph.producer[bn.inputs[0]] is dense
    assert graph.consumers_of(dense.outputs[0]) == [bn]
    assert dense.outputs[0] in graph.scope_outputs
    assert graph.outputs == {bn.outputs[0]}


def test_shared_layer_and_shared_nested_model_have_several_calls():
    dense = L.Dense(4, name="shared")
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, L.Dense(4, name="in_block")(inner_in), name="block")
    x = keras.Input((4,))
    y = inner(inner(dense(dense(x))))
    graph = build_graph(keras.Model(x, y))
    assert len(graph.calls_of(dense)) == 2
    assert len(graph.calls_of(inner.get_layer("in_block"))) == 2
    assert len(graph.calls) == 4


def test_consumers_and_model_outputs_counted():
    x = keras.Input((4,))
    h = L.Dense(4)(x)
    model = keras.Model(x, [L.ReLU()(h), L.Add()([h, h]), h])
    graph = build_graph(model)
    tid = graph.calls[0].outputs[0]
    assert len(graph.consumers_of(tid)) == 2  # Add reads it twice but is one consumer
    assert graph.n_readers(tid) == 3


def test_sequential_is_read_through_its_graph():
    model = keras.Sequential([keras.Input((3,)), L.Dense(2), L.ReLU()])
    assert [type(c.layer).__name__ for c in build_graph(model).calls] == ["Dense", "ReLU"]


def test_unbuilt_sequential_is_refused_and_subclassed_has_an_empty_graph():
    with pytest.raises(UnsupportedModelError, match="no input shape"):
        build_graph(keras.Sequential([L.Dense(2)]))

    class Net(keras.Model):
        def call(self, x):
            return x

    net = Net()
    net(np.ones((1, 2), "float32"))
    # Its layer calls are only known from a trace (kerasbn.folding.dataflow).
    assert build_graph(net).calls == []
    with pytest.raises(UnsupportedModelError, match="Expected a Keras model"):
        build_graph(L.Dense(2))
