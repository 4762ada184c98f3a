"""Property: on random small graphs, fold never changes outputs and never folds an inexact case."""

from __future__ import annotations

import keras
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kerasbn
from kerasbn.folding import plan
from kerasbn.folding.families import Dense, family_of
from kerasbn.folding.graph import build_graph
from tests.helpers import assert_same_outputs, randomize_biases, randomize_bn

L = keras.layers

STEP = st.one_of(
    st.tuples(
        st.just("conv"),
        st.integers(2, 4),
        st.sampled_from([1, 3]),
        st.sampled_from(["valid", "same"]),
        st.sampled_from([None, "relu"]),
        st.booleans(),
    ),
    st.tuples(st.just("depthwise"), st.sampled_from([1, 2]), st.sampled_from(["valid", "same"])),
    st.tuples(st.just("separable"), st.integers(2, 4), st.sampled_from(["valid", "same"])),
    st.tuples(st.just("bn")),
    st.tuples(st.just("relu")),
    st.tuples(st.just("pool")),
    st.tuples(st.just("branch"), st.sampled_from(["add", "concat"])),
    st.tuples(st.just("shared")),
    st.tuples(st.just("nested"), st.booleans()),
    st.tuples(st.just("fanout")),
)

SPEC = st.tuples(
    st.lists(STEP, min_size=1, max_size=6),
    st.sampled_from(["gap_dense_bn", "bn_flatten_dense", "two_outputs"]),
)


def _build(spec):
    steps, head = spec
    x = keras.Input((6, 6, 3), name="image")
    h, n = x, 6

    def padding(p):
        # Keep the feature map at least 2×2.
        return p if n >= 4 else "same"

    for step in steps:
        name = step[0]
        if name == "conv":
            _, filters, k, pad, act, bias = step
            pad = padding(pad)
            h = L.Conv2D(filters, k, padding=pad, activation=act, use_bias=bias)(h)
            n -= (k - 1) if pad == "valid" else 0
        elif name == "depthwise":
            _, mult, pad = step
            pad = padding(pad)
            h = L.DepthwiseConv2D(3, depth_multiplier=mult, padding=pad)(h)
            n -= 2 if pad == "valid" else 0
        elif name == "separable":
            _, filters, pad = step
            pad = padding(pad)
            h = L.SeparableConv2D(filters, 3, padding=pad)(h)
            n -= 2 if pad == "valid" else 0
        elif name == "bn":
            h = L.BatchNormalization()(h)
        elif name == "relu":
            h = L.ReLU()(h)
        elif name == "pool":
            h = L.MaxPooling2D(2, strides=1, padding="same")(h)
        elif name == "branch":
            a = L.BatchNormalization()(L.Conv2D(3, 1)(h))
            b = L.BatchNormalization()(L.Conv2D(3, 3, padding="same")(h))
            h = L.Add()([a, b]) if step[1] == "add" else L.Concatenate()([a, b])
        elif name == "shared":
            channels = h.shape[-1]
            conv = L.Conv2D(channels, 1)
            h = L.BatchNormalization()(conv(L.ReLU()(L.BatchNormalization()(conv(h)))))
        elif name == "nested":
            inner_in = keras.Input(h.shape[1:])
            inner = L.BatchNormalization()(inner_in) if step[1] else inner_in
            inner = L.BatchNormalization()(L.Conv2D(3, 3, padding="same")(inner))
            h = keras.Model(inner_in, inner)(h)
        elif name == "fanout":
            h = L.Add()([L.BatchNormalization()(h), h])
    if head == "gap_dense_bn":
        y = L.BatchNormalization()(L.Dense(3)(L.GlobalAveragePooling2D()(h)))
        return keras.Model(x, y)
    if head == "bn_flatten_dense":
        return keras.Model(x, L.Dense(3)(L.Flatten()(L.BatchNormalization()(h))))
    return keras.Model(x, [L.BatchNormalization()(h), L.Dense(2)(L.GlobalAveragePooling2D()(h))])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SPEC)
def test_fold_preserves_outputs_on_random_graphs(spec):
    model = randomize_biases(randomize_bn(_build(spec)))
    result = kerasbn.fold(model)
    assert_same_outputs(model, result.model, batch_size=2)
    layers = {layer.name: layer for layer in model._flatten_layers(include_self=False, recursive=True)}
    for finding in result.report.folded:
        partner = layers[finding.partner]
        if finding.direction == "forward" and not isinstance(family_of(partner), Dense):
            # Never across zero padding.
            assert partner.padding == "valid" or all(k == 1 for k in partner.kernel_size)
        if finding.direction == "backward":
            assert plan.activation_name(partner) is None
    # Nothing foldable is left behind, except a BN whose neighbour was another
    # BN that has now gone (one pass decides every BN on the original graph).
    graph = build_graph(model)
    folded = {f.layer for f in result.report.folded}
    for finding in kerasbn.fold(result.model).report.folded:
        (bn,) = graph.calls_of(layers[finding.layer])
        producer = graph.producer.get(bn.inputs[0])
        neighbours = [producer] + graph.consumers_of(bn.outputs[0])
        assert any(c is not None and c.layer.name in folded for c in neighbours), finding
