"""kerasbn.verify: random inputs for any input structure, tolerance verdicts."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy import verify as verify_module
from kerasbn.deploy.tolerances import RELATIVE_CEILING, RELATIVE_FLOOR
from kerasbn.deploy.verify import compare, random_inputs
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


# The default check: scale-aware and calibrated to the model's own float32 noise.

DELTA = 1e-3  # a "slight" corruption: 0.1 % per channel


def _conv_chain(blocks: int) -> keras.Model:
    """``blocks`` × (Conv 3×3 → BN → ReLU) with residual sums: deep enough to amplify float32 rounding."""
    x = keras.Input((12, 12, 8))
    h = x
    for i in range(blocks):
        y = L.ReLU()(L.BatchNormalization(name=f"bn{i}")(L.Conv2D(8, 3, padding="same", name=f"conv{i}")(h)))
        h = L.Add()([h, y]) if i % 2 else y
    return randomize_bn(keras.Model(x, L.Dense(5, name="head")(L.GlobalAveragePooling2D()(h))), seed=blocks)


def _corrupt(model: keras.Model, layer: str, what: str) -> keras.Model:
    """A copy of ``model`` with one folded weight off by DELTA: kernel along the wrong (input) axis, or bias."""
    bad = keras.models.clone_model(model)
    bad.set_weights(model.get_weights())
    target = bad.get_layer(layer)
    rng = np.random.default_rng(7)
    if what == "wrong_axis":
        k = np.asarray(target.kernel)
        target.kernel.assign(k * (1 + DELTA * rng.uniform(-1, 1, (k.shape[-2], 1))))
    else:
        b = np.asarray(target.bias)
        target.bias.assign(b + DELTA * max(float(np.max(np.abs(b))), 1.0) * rng.uniform(-1, 1, b.shape))
    return bad


@pytest.mark.parametrize("blocks", [2, 24], ids=["small", "deep"])
@pytest.mark.parametrize("what", ["wrong_axis", "wrong_bias"])
def test_default_check_accepts_the_fold_and_rejects_a_slightly_wrong_one(blocks, what):
    model = _conv_chain(blocks)
    folded = kerasbn.fold(model).model
    good = kerasbn.verify(model, folded, seed=1)
    assert good.passed and good.margin <= 1 and good.allowed is not None
    assert good.allowed >= RELATIVE_FLOOR and "margin" in str(good)
    bad = kerasbn.verify(model, _corrupt(folded, f"conv{blocks // 2}", what), seed=1)
    assert not bad.passed and bad.margin > 1


def test_noise_is_measured_relative_to_each_output():
    model = _conv_chain(6)
    inputs = random_inputs(model, 4, seed=2)
    (eta,) = verify_module.noise(model, inputs)
    # Another valid evaluation order moves the outputs by a few float32 ulps of their scale at most.
    assert 0 <= eta < 1e-4


def test_scale_aware_check_ignores_near_zero_elements_that_element_wise_trips_on():
    y = np.array([[1000.0, 1e-9, -3.0]])
    z = y + np.array([[1e-3, 1e-6, 1e-6]])
    default = compare([y], [z], batch_size=1)
    assert default.passed and default.max_rel_error == pytest.approx(1e-6) and default.atol is None
    assert not compare([y], [z], batch_size=1, atol=1e-9, rtol=1e-9).passed
    # Each output is judged against its own scale.
    assert not compare([y, np.array([1.0])], [y, np.array([1.001])], batch_size=1).passed


def test_noise_widens_the_allowance():
    y, z = np.array([1.0, 2.0]), np.array([1.0, 2.0002])
    assert not compare([y], [z], batch_size=2).passed
    assert not compare([y], [z], batch_size=2, noise=[0.0]).passed
    result = compare([y], [z], batch_size=2, noise=[5e-5])
    assert result.passed and result.allowed == pytest.approx(2e-4) and result.noise == 5e-5
    assert result.margin == pytest.approx(1e-4 / 2e-4)


def test_a_model_too_noisy_to_check_fails():
    y, z = np.array([1.0, 2.0]), np.array([1.0, 2.2])
    result = compare([y], [z], batch_size=2, noise=[0.5])
    assert not result.passed and result.allowed == RELATIVE_CEILING
