"""kerasbn.strip_redundant_biases: biases move into the BN mean, outputs unchanged."""

from __future__ import annotations

import keras
import numpy as np

import kerasbn
from tests.helpers import assert_same_outputs, randomize_biases, randomize_bn

L = keras.layers


def _model():
    x = keras.Input((7, 7, 3))
    h = L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="c1")(x))
    h = L.BatchNormalization(name="bn2")(L.DepthwiseConv2D(3, name="dw")(L.ReLU()(h)))
    h = L.Conv2D(5, 1, activation="relu", name="c_act")(h)  # activation: bias not redundant
    h = L.Dense(3, name="d")(L.GlobalAveragePooling2D()(L.BatchNormalization(name="bn3")(h)))
    y = kerasbn.BatchNormalization(name="bn4")(h)
    return randomize_biases(randomize_bn(keras.Model(x, y)))


def test_strip_moves_biases_into_moving_mean():
    model = _model()
    stripped = kerasbn.strip_redundant_biases(model).model
    assert [layer.name for layer in stripped.layers if not getattr(layer, "use_bias", True)] == ["c1", "dw", "d"]
    assert stripped.get_layer("c_act").use_bias
    assert_same_outputs(model, stripped)
    assert model.get_layer("c1").use_bias  # the original is untouched
    assert kerasbn.audit(stripped).redundant_biases == []
    assert stripped.count_params() == model.count_params() - (4 + 4 + 3)


def test_stripped_model_still_trains_and_folds():
    stripped = kerasbn.strip_redundant_biases(_model()).model
    stripped.compile(optimizer="sgd", loss="mse")
    loss = stripped.fit(np.ones((4, 7, 7, 3), "float32"), np.zeros((4, 3), "float32"), verbose=0).history["loss"]
    assert np.isfinite(loss[0])
    assert_same_outputs(stripped, kerasbn.fold(stripped).model)
