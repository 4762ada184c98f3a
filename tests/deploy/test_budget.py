"""`kerasbn.deploy.budget`: the check's batch from the model's activation sizes within a memory budget."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy import budget
from kerasbn.deploy.budget import FLOAT64, LIVE, check_batch, per_sample_bytes
from tests.helpers import assert_matches_original, file_outputs, randomize_bn

L = keras.layers


def _conv(size: int, filters: int) -> keras.Model:
    x = keras.Input((size, size, 3))
    return keras.Model(x, L.GlobalAveragePooling2D()(L.Conv2D(filters, 3, padding="same")(x)))


@pytest.mark.parametrize(("size", "filters"), [(16, 4), (64, 16), (32, 2)])
def test_the_largest_activation_sets_the_cost_of_a_sample(size, filters):
    # The largest tensor is the convolution's output, or the input where it has more channels.
    assert per_sample_bytes(_conv(size, filters)) == LIVE * FLOAT64 * size * size * max(filters, 3)


@pytest.mark.parametrize("budget_samples", [0.5, 1, 2.5, 8, 100])
def test_the_batch_is_what_the_budget_holds_between_1_and_the_request(budget_samples):
    model = _conv(64, 16)
    per_sample = per_sample_bytes(model)
    chosen = check_batch(model, 8, budget=int(budget_samples * per_sample))
    assert chosen.batch == max(1, min(8, int(budget_samples)))
    assert chosen.reduced == (chosen.batch < 8)
    if chosen.reduced:
        assert str(chosen).startswith(f"batch {chosen.batch} instead of 8: the model's activations take about ")
    else:
        assert str(chosen) == "batch 8"


def test_a_nested_model_s_activations_count():
    inner_input = keras.Input((32, 32, 3))
    inner = keras.Model(inner_input, L.Conv2D(64, 3, padding="same")(inner_input))
    x = keras.Input((32, 32, 3))
    model = keras.Model(x, L.GlobalAveragePooling2D()(inner(x)))
    assert per_sample_bytes(model) == LIVE * FLOAT64 * 32 * 32 * 64


def test_unknown_sizes_count_as_the_random_inputs_draw_them():
    x = keras.Input((None, None, 3))
    model = keras.Model(x, L.Conv2D(5, 1)(x))
    assert per_sample_bytes(model) == LIVE * FLOAT64 * 8 * 8 * 5


def test_a_subclassed_model_counts_its_inputs():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(1000)

        def call(self, inputs):
            return self.dense(inputs)

    model = Net()
    model(keras.ops.zeros((1, 20)))
    assert per_sample_bytes(model) == LIVE * FLOAT64 * 20


@pytest.fixture
def three_samples(monkeypatch):
    """A budget that holds three samples of `_conv_bn`'s activations."""
    model = _conv_bn()
    monkeypatch.setattr(budget, "DEFAULT_BUDGET", 3 * per_sample_bytes(model))
    return model


def _conv_bn() -> keras.Model:
    keras.utils.set_random_seed(0)
    x = keras.Input((32, 32, 3), name="image")
    y = L.BatchNormalization()(L.Conv2D(16, 3)(x))
    return randomize_bn(keras.Model(x, L.GlobalAveragePooling2D()(y)))


def test_verify_checks_at_the_batch_the_budget_holds_and_says_so(three_samples):
    result = kerasbn.verify(three_samples, kerasbn.fold(three_samples).model, batch_size=8)
    assert result.passed and result.batch_size == 3
    assert result.batch_note.startswith("batch 3 instead of 8: the model's activations take about ")
    # Inputs the user gives are checked as given.
    x = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype("float32")
    given = kerasbn.verify(three_samples, kerasbn.fold(three_samples).model, x)
    assert given.batch_size == 5 and given.batch_note is None


def test_an_export_is_checked_at_the_batch_the_budget_holds(three_samples, tmp_path):
    path = tmp_path / "m.onnx"
    result = kerasbn.export(three_samples, path, checks=kerasbn.Checks(batch_sizes=(1, 8)))
    assert [c.batch_size for c in result.checks] == [1, 3]
    assert [c.batch_note is not None for c in result.checks] == [False, True]  # batch 1 is as asked
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    assert_matches_original(three_samples, file_outputs(path, "onnx", three_samples, x), x, "float32")
