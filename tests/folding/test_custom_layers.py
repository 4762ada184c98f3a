"""BN inside custom layers and subclassed models: found by the trace, folded in place."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.folding import dataflow, plan
from kerasbn.folding import fold as fold_module
from kerasbn.folding.fold import identity_variance
from tests.helpers import assert_same_outputs, count_bn, randomize_biases, randomize_bn

L = keras.layers


@keras.saving.register_keras_serializable(package="kbn_test")
class ConvBlock(L.Layer):
    """conv → BN → activation inside ``call``; with ``reuse`` the conv output also joins a residual sum."""

    def __init__(self, filters=4, reuse=False, use_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.reuse, self.use_bias = filters, reuse, use_bias
        self.conv = L.Conv2D(filters, 3, padding="same", use_bias=use_bias, name="conv")
        self.bn = L.BatchNormalization(name="bn")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.bn.build((*input_shape[:-1], self.filters))

    def call(self, x):
        y = self.conv(x)
        z = keras.activations.relu(self.bn(y))
        return z + y if self.reuse else z

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "reuse": self.reuse, "use_bias": self.use_bias}


@keras.saving.register_keras_serializable(package="kbn_test")
class Net(keras.Model):
    """A subclassed model: a block, pooling, Dense → BN."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = ConvBlock(4, name="block")
        self.dense = L.Dense(3, name="dense")
        self.bn = L.BatchNormalization(name="head_bn")

    def call(self, x):
        return self.bn(self.dense(keras.ops.mean(self.block(x), axis=(1, 2))))


def _blocks_model(reuse_second: bool = True) -> keras.Model:
    x = keras.Input((8, 8, 3))
    y = ConvBlock(4, name="b1")(x)
    y = ConvBlock(4, reuse=reuse_second, use_bias=True, name="b2")(y)
    y = L.BatchNormalization(name="outer")(L.Conv2D(5, 1, name="head")(y))
    return randomize_biases(randomize_bn(keras.Model(x, y)))


def _net() -> keras.Model:
    net = Net()
    net(np.zeros((1, 8, 8, 3), "float32"))
    return randomize_biases(randomize_bn(net))


def _by_layer(findings):
    return {f.layer: f for f in findings}


@pytest.mark.parametrize("make", [_blocks_model, _net], ids=["custom_blocks", "subclassed"])
def test_audit_sees_every_bn(make):
    model = make()
    report = kerasbn.audit(model)
    assert report.bn_layers == count_bn(model)
    for f in report.batch_norms:
        assert f.foldable or (f.code in set(plan.Reason) and f.reason)


def test_bn_inside_a_custom_layer_folds_in_place_and_reuse_is_refused():
    model = _blocks_model()
    before = [np.array(w) for w in model.get_weights()]
    result = kerasbn.fold(model)
    found = _by_layer(result.report.folded + result.report.not_folded)
    assert found["outer"].how == plan.REMOVED
    inner = [f for f in result.report.folded if f.path.startswith("b1/")]
    assert len(inner) == 1 and inner[0].how == plan.IN_PLACE and inner[0].partner == "conv"
    # b2's conv output also feeds the residual sum: folding into it would change that sum.
    (refused,) = [f for f in result.report.not_folded if f.path.startswith("b2/")]
    assert refused.code == plan.Reason.MULTIPLE_CONSUMERS and "conv" in refused.reason
    assert result.report.method == "mixed"
    assert_same_outputs(model, result.model)
    # The input model is untouched.
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(before, model.get_weights()))


def test_folded_in_place_bn_is_an_identity():
    model = _blocks_model(reuse_second=False)
    folded = kerasbn.fold(model).model
    for layer in folded._flatten_layers(include_self=False):
        if plan.is_bn(layer):
            w = {v.name: np.asarray(v) for v in layer.weights}
            assert np.all(w["gamma"] == 1) and np.all(w["moving_mean"] == 0)
            assert np.all(np.float32(w["moving_variance"] + np.float32(layer.epsilon)) == 1)


def test_subclassed_model_folds_in_place_and_reloads(tmp_path):
    net = _net()
    result = kerasbn.fold(net)
    assert result.report.method == plan.IN_PLACE and len(result.report.folded) == 2
    assert isinstance(result.model, Net)
    inputs = np.random.default_rng(3).standard_normal((4, 8, 8, 3)).astype("float32")
    assert_same_outputs(net, result.model, inputs)
    kerasbn.save_model(result.model, tmp_path / "net.keras")
    assert_same_outputs(net, kerasbn.load_model(tmp_path / "net.keras"), inputs)
    assert kerasbn.verify(net, result.model).passed


def test_model_that_cannot_be_rebuilt_is_folded_in_place(monkeypatch):
    model = _blocks_model(reuse_second=False)

    def refuse(*args, **kwargs):
        raise kerasbn.errors.UnsupportedModelError("Layer 'x' (X) cannot be re-created from its config: no.")

    monkeypatch.setattr(fold_module, "rebuild", refuse)
    result = kerasbn.fold(model)
    assert result.report.method == plan.IN_PLACE and len(result.report.folded) == 3
    assert result.report.notes and "in place" in result.report.notes[0]
    assert "in place" in str(result.report)
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("bn_class", [L.BatchNormalization, kerasbn.BatchNormalization])
@pytest.mark.parametrize("epsilon", [1e-3, 1.001e-5, 1e-5, 1e-6, 0.1])
def test_identity_statistics_are_exact_in_float32(bn_class, epsilon):
    bn = bn_class(epsilon=epsilon)
    bn.build((None, 6))
    beta = np.random.default_rng(0).standard_normal(6).astype("float32")
    variance = identity_variance(bn.epsilon, "float32")
    values = {"gamma": np.ones(6), "beta": beta, "moving_mean": np.zeros(6), "moving_variance": np.full(6, variance)}
    for w in bn.weights:
        w.assign(values[w.name].astype("float32"))
    # Values over 16 orders of magnitude: an inexact identity would show in the last bits.
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 6)) * 10.0 ** rng.uniform(-8, 8, (64, 1))).astype("float32")
    model = keras.Sequential([keras.Input((6,)), bn])
    assert np.array_equal(model.predict_on_batch(x), x + beta)


def test_traced_graph_names_layer_calls_and_ops():
    model = _blocks_model()
    graph = dataflow.build_traced_graph(model)
    layers = [c.layer for c in graph.calls]
    assert sum(plan.is_bn(layer) for layer in layers) == count_bn(model)
    assert any(isinstance(layer, dataflow.Op) and layer.type == "Relu" for layer in layers)
    conv = model.get_layer("b1").conv
    (call,) = graph.calls_of(conv)
    assert [c.layer.name for c in graph.consumers_of(call.outputs[0])] == ["bn"]


def test_shared_conv_inside_a_custom_layer_is_refused():
    @keras.saving.register_keras_serializable(package="kbn_test")
    class Twice(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = L.Conv2D(3, 1, name="conv")
            self.bn = L.BatchNormalization(name="bn")

        def call(self, x):
            return self.bn(self.conv(self.conv(x)))

    x = keras.Input((4, 4, 3))
    model = randomize_bn(keras.Model(x, Twice(name="twice")(x)))
    (finding,) = kerasbn.audit(model).batch_norms
    assert finding.code == plan.Reason.SHARED_LAYER


@keras.saving.register_keras_serializable(package="kbn_test")
class PreNorm(L.Layer):
    """BN → conv (valid padding) → ReLU inside ``call``: a forward fold, in place."""

    def __init__(self, use_bias=True, kerasbn_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.use_bias, self.kerasbn_bn = use_bias, kerasbn_bn
        self.bn = (kerasbn.BatchNormalization if kerasbn_bn else L.BatchNormalization)(name="bn")
        self.conv = L.Conv2D(4, 3, use_bias=use_bias, name="conv")

    def build(self, input_shape):
        self.bn.build(input_shape)
        self.conv.build(input_shape)

    def call(self, x):
        return keras.activations.relu(self.conv(self.bn(x)))

    def get_config(self):
        return {**super().get_config(), "use_bias": self.use_bias, "kerasbn_bn": self.kerasbn_bn}


@pytest.mark.parametrize("kerasbn_bn", [False, True], ids=["keras_bn", "kerasbn_bn"])
def test_forward_fold_inside_a_custom_layer(kerasbn_bn):
    x = keras.Input((6, 6, 3))
    model = randomize_biases(randomize_bn(keras.Model(x, PreNorm(kerasbn_bn=kerasbn_bn, name="pre")(L.ReLU()(x)))))
    result = kerasbn.fold(model)
    (finding,) = result.report.folded
    assert (finding.direction, finding.how, finding.partner) == (plan.FORWARD, plan.IN_PLACE, "conv")
    assert_same_outputs(model, result.model)


def test_forward_fold_in_place_needs_a_bias():
    x = keras.Input((6, 6, 3))
    model = randomize_bn(keras.Model(x, PreNorm(use_bias=False, name="pre")(L.ReLU()(x))))
    (finding,) = kerasbn.audit(model).batch_norms
    assert finding.code == plan.Reason.NO_BIAS_SLOT and not finding.foldable


@keras.saving.register_keras_serializable(package="kbn_test")
class Odd(L.Layer):
    """One BN built but never called, one whose variables the block reads itself."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(3, 1, name="conv")
        self.spare = L.BatchNormalization(name="spare")
        self.borrowed = L.BatchNormalization(name="borrowed")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.spare.build(input_shape)
        self.borrowed.build(input_shape)

    def call(self, x):
        bn = self.borrowed
        y = self.conv(x)
        return keras.ops.batch_normalization(y, bn.moving_mean, bn.moving_variance, -1, bn.beta, bn.gamma, bn.epsilon)


def test_unused_and_untraceable_bn_are_reported():
    x = keras.Input((4, 4, 3))
    model = keras.Model(x, Odd(name="odd")(x))
    found = _by_layer(kerasbn.audit(model).batch_norms)
    assert found["spare"].code == plan.Reason.UNUSED
    assert found["borrowed"].code == plan.Reason.UNTRACED
