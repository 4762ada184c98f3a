"""kerasbn.verify: random inputs for any input structure, tolerance verdicts."""

from __future__ import annotations

import json

import keras
import numpy as np

import kerasbn
from kerasbn.deploy.verify import random_inputs
from tests.helpers import randomize_bn

L = keras.layers


def _two_in_two_out(scale=1.0):
    a = keras.Input((3,), name="a")
    b = keras.Input((2, 4), name="b")
    ya = L.Dense(2, name="ya", kernel_initializer="ones")(a)
    yb = L.Rescaling(scale, name="yb")(b)
    return keras.Model({"a": a, "b": b}, [ya, yb])


def test_identical_models_pass_with_random_inputs():
    model = _two_in_two_out()
    result = kerasbn.verify(model, model, batch_size=3)
    assert result.passed and result.max_abs_error == 0.0 and result.outputs == 2 and result.batch_size == 3
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    assert "passed" in str(result)


def test_difference_is_measured_and_fails():
    result = kerasbn.verify(_two_in_two_out(), _two_in_two_out(1.01), seed=3)
    assert not result.passed
    assert 0 < result.max_rel_error < 0.02
    assert result.max_abs_error == result.max_rel_error * result.max_abs_reference


def test_given_inputs_and_tolerance():
    model = _two_in_two_out()
    inputs = {"a": np.ones((2, 3), "float32"), "b": np.ones((2, 2, 4), "float32")}
    assert kerasbn.verify(model, _two_in_two_out(1.001), inputs, rtol=1e-2).passed


def test_random_inputs_follow_dtypes_and_structure():
    x = keras.Input((None,), dtype="int32", name="ids")
    y = keras.Input((2,), name="y")
    model = keras.Model([x, y], L.Add()([L.Embedding(2, 2)(x)[:, 0], y]))
    ids, values = random_inputs(model, batch_size=5)
    assert ids.shape == (5, 8) and ids.dtype == np.int32 and set(np.unique(ids)) <= {0, 1}
    assert values.shape == (5, 2) and values.dtype == np.float32


def test_nan_output_fails():
    x = keras.Input((2,))
    model = keras.Model(x, L.Rescaling(1.0)(x))
    nan_model = keras.Model(x, L.Rescaling(float("nan"))(x))
    result = kerasbn.verify(model, nan_model)
    assert not result.passed and result.max_abs_error == float("inf")


def test_channels_first_conv_with_channels_equal_to_width():
    # Eager TF CPU kernels add this bias along the wrong axis; verify uses the
    # compiled path, so a correct fold passes.
    x = keras.Input((3, 6, 6))
    y = L.BatchNormalization(axis=1)(L.Conv2D(4, 3, data_format="channels_first")(x))
    model = randomize_bn(keras.Model(x, y))
    result = kerasbn.verify(model, kerasbn.fold(model).model)
    assert result.passed and result.max_rel_error < 1e-5
