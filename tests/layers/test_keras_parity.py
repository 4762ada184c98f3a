"""Keras's own BatchNormalization test cases, run against kerasbn with unbiased=False.

Each case is restated from keras/src/layers/normalization/batch_normalization_test.py
and checked against keras.layers.BatchNormalization in the same run.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

import kerasbn

LAYERS = {
    "keras": keras.layers.BatchNormalization,
    "kerasbn": lambda **kw: kerasbn.BatchNormalization(unbiased=False, **kw),
}


@pytest.mark.parametrize(
    "axis,shape,mean_init,var_init",
    list(itertools.product((-1, 1), ((5, 2, 3), (5, 3, 3, 2)), ("zeros", "ones"), ("zeros", "ones"))),
)
def test_correctness(axis, shape, mean_init, var_init):
    outputs = {}
    for name, make in LAYERS.items():
        layer = make(axis=axis, momentum=0, moving_mean_initializer=mean_init, moving_variance_initializer=var_init)
        x = np.random.default_rng(0).normal(5.0, 10.0, shape).astype("float32")
        out = x
        for _ in range(3):
            out = layer(out, training=True)
        out = keras.ops.convert_to_numpy(out)
        axes = tuple(a for a in range(len(shape)) if a != axis % len(shape))
        np.testing.assert_allclose(out.mean(axes), 0.0, atol=1e-3)
        np.testing.assert_allclose(out.std(axes), 1.0, atol=1e-3)
        np.testing.assert_allclose(np.asarray(layer.moving_mean), 0.0, atol=1e-3)
        np.testing.assert_allclose(np.asarray(layer.moving_variance), 1.0, atol=1e-3)
        outputs[name] = (out, keras.ops.convert_to_numpy(layer(x, training=False)))
    for a, b in zip(outputs["keras"], outputs["kerasbn"]):
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
