"""Keras's own BatchNormalization test cases, run against kerasbn with unbiased=False.

Each case is restated from keras/src/layers/normalization/batch_normalization_test.py
and checked against keras.layers.BatchNormalization in the same run, with the
expected values computed by the float64 reference rather than assumed.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

import kerasbn
from tests import reference

LAYERS = {
    "keras": keras.layers.BatchNormalization,
    "kerasbn": lambda **kw: kerasbn.BatchNormalization(unbiased=False, **kw),
}


@pytest.mark.parametrize(
    "axis,shape,mean_init,var_init",
    list(itertools.product((-1, 1), ((5, 2, 3), (5, 3, 3, 2)), ("zeros", "ones"), ("zeros", "ones"))),
)
def test_correctness(axis, shape, mean_init, var_init):
    """Three training passes with momentum 0: each output is Algorithm 1 of its input.

    The expected values come from the float64 reference on the very float32
    input of the last pass: its variance is not 1 but about 1/(1 + ε), and
    kerasbn must be within float32 rounding of it; Keras's layer is held to
    1e-5 (it promises no more), and both layers to each other.
    """
    x = np.random.default_rng(0).normal(5.0, 10.0, shape).astype("float32")
    outputs = {}
    for name, make in LAYERS.items():
        layer = make(axis=axis, momentum=0, moving_mean_initializer=mean_init, moving_variance_initializer=var_init)
        out = x
        for _ in range(3):
            last = out
            out = keras.ops.convert_to_numpy(layer(last, training=True))
        expected, mu, var, _ = reference.algorithm1(last, axis, eps=layer.epsilon)
        mu, var = mu.ravel(), var.ravel()
        np.testing.assert_allclose(out, expected, atol=1e-5)
        mean_error = np.abs(np.asarray(layer.moving_mean, np.float64) - mu)
        variance_error = np.abs(np.asarray(layer.moving_variance, np.float64) - var) / var
        if name == "kerasbn":
            unit = reference.UNIT
            assert np.all(mean_error <= unit * np.abs(mu) + 8 * unit * np.sqrt(var)), mean_error
            assert np.all(variance_error <= reference.variance_tolerance(mu, var)), variance_error
        else:
            assert np.all(mean_error <= 1e-5 * np.sqrt(var)) and np.all(variance_error <= 1e-5)
        outputs[name] = (out, keras.ops.convert_to_numpy(layer(x, training=False)))
    for a, b in zip(outputs["keras"], outputs["kerasbn"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name", LAYERS)
def test_input_fully_masked(name):
    layer = LAYERS[name](scale=False, center=False)
    y = layer(np.zeros((4, 5), "float32"), mask=np.zeros((4,), "float32"), training=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y), np.zeros((4, 5)))


@pytest.mark.parametrize("mask_value", [0.0, 0.1, 1.0])
def test_masked_values_are_ignored_in_fit(mask_value):
    pattern = [[1, 5], [2, 5], [mask_value, mask_value], [mask_value, mask_value]]
    data = np.array([pattern] * 10, dtype="float32")
    inputs = keras.Input((None, 2))
    normed = kerasbn.BatchNormalization(momentum=0.0, unbiased=False)(keras.layers.Masking(mask_value)(inputs))
    model = keras.Model(inputs, normed)
    model.compile("rmsprop", loss="mse")
    model.fit(data, data, batch_size=10, epochs=5, verbose=0)
    np.testing.assert_allclose(np.asarray(model.layers[2].moving_mean), [1.5, 5.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.layers[2].moving_variance), [0.25, 0.0], atol=1e-6)


def test_masked_broadcast_normalization():
    layer = kerasbn.BatchNormalization(momentum=0.0, unbiased=False)
    y = keras.ops.convert_to_numpy(layer(np.ones((1, 2, 3, 4), "float32"), training=True, mask=np.ones((1, 2, 1))))
    np.testing.assert_allclose(y, 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.moving_mean), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), 0.0, atol=1e-6)


def test_trainable_toggle_changes_weights_lists():
    layer = kerasbn.BatchNormalization(momentum=0.8, epsilon=1e-7, unbiased=False)
    layer.build((1, 4, 4, 3))
    layer.trainable = False
    assert (len(layer.weights), len(layer.trainable_weights), len(layer.non_trainable_weights)) == (4, 0, 4)
    x = np.random.default_rng(0).normal(5.0, 10.0, (200, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x, training=True)), x, rtol=1e-6)
    layer.trainable = True
    assert (len(layer.trainable_weights), len(layer.non_trainable_weights)) == (2, 2)


def test_regularizers_add_losses():
    layer = kerasbn.BatchNormalization(gamma_regularizer="l2", beta_regularizer="l2")
    layer(np.ones((2, 3), "float32"))
    assert len(layer.losses) == 2
