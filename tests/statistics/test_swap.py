"""`kerasbn.swap`: Keras's BN ↔ kerasbn's, weights bit for bit, outputs unchanged."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy.verify import random_inputs
from kerasbn.errors import KerasbnError
from kerasbn.folding import plan
from tests.helpers import assert_same_outputs, outputs, randomize_bn
from tests.statistics.test_calibrate import nested_model


def bn_classes(model: keras.Model) -> list[type]:
    return [type(layer) for layer in model._flatten_layers(include_self=False, recursive=True) if plan.is_bn(layer)]


def assert_round_trip(model: keras.Model, inputs=None) -> None:
    """Keras → kerasbn → Keras: same weights bit for bit, same outputs, only kerasbn in between."""
    inputs = random_inputs(model, 4, seed=0) if inputs is None else inputs
    there = kerasbn.swap(model, to="kerasbn")
    assert set(bn_classes(there.model)) == {kerasbn.BatchNormalization}
    assert not there.report.stayed
    # kerasbn's inference is (x − E[x])·a + β, Keras's x·a + b: equal to float32 rounding.
    assert_same_outputs(model, there.model, inputs)
    back = kerasbn.swap(there.model, to="keras")
    assert set(bn_classes(back.model)) == {keras.layers.BatchNormalization}
    assert len(model.weights) == len(back.model.weights)
    for a, b in zip(model.weights, back.model.weights):
        assert a.name == b.name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(outputs(model, inputs), outputs(back.model, inputs)):
        np.testing.assert_array_equal(a, b)


def small_functional() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, center=False)(x)
    x = keras.layers.Conv2D(4, 1)(x)
    x = keras.layers.BatchNormalization(axis=1, scale=False)(x)
    return randomize_bn(keras.Model(inputs, x))


def small_sequential() -> keras.Model:
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    return randomize_bn(model)


@pytest.mark.parametrize("build", [small_functional, small_sequential, nested_model])
def test_round_trip_is_exact(build):
    assert_round_trip(build())


def test_settings_are_kept():
    model = small_functional()
    swapped = kerasbn.swap(model).model
    for old, new in zip(
        [x for x in model.layers if plan.is_bn(x)], [x for x in swapped.layers if plan.is_bn(x)], strict=True
    ):
        new_config = new.get_config()
        assert new_config.pop("unbiased") is False  # Keras's (biased) moving variance, recorded
        assert new_config.pop("virtual_batch_size") is None
        assert new_config == old.get_config()


def test_unbiased_on_request():
    swapped = kerasbn.swap(small_sequential(), unbiased=True).model
    assert [layer.unbiased for layer in swapped.layers if plan.is_bn(layer)] == [True]


def test_custom_layer_bns_are_swapped_in_memory_and_reported():
    result = kerasbn.swap(nested_model())
    assert [p for p in result.report.inside_custom if p.startswith("block/")]
    block = result.model.get_layer("block")
    assert isinstance(block.bn, kerasbn.BatchNormalization)
    assert block.bn in block._layers and len(block.weights) == 6  # the old BN is gone from the tracking


def test_settings_keras_cannot_hold_stay_kerasbn():
    inputs = keras.Input((4,))
    x = kerasbn.BatchNormalization(momentum=None, name="cumulative")(inputs)
    x = kerasbn.BatchNormalization(virtual_batch_size=2, name="ghost")(x)
    x = kerasbn.BatchNormalization(unbiased=True, name="plain")(x)
    result = kerasbn.swap(keras.Model(inputs, x), to="keras")
    assert [p for p, _ in result.report.stayed] == ["cumulative", "ghost"]
    assert result.report.swapped == ["plain"]
    assert any("unbiased=True dropped" in note for note in result.report.notes)
    assert_same_outputs(keras.Model(inputs, x), result.model)


def test_unknown_target():
    with pytest.raises(KerasbnError, match="unknown swap target"):
        kerasbn.swap(small_sequential(), to="torch")


def test_saved_swapped_model_reloads_as_kerasbn(tmp_path):
    model = small_functional()
    swapped = kerasbn.swap(model).model
    path = kerasbn.save_model(swapped, tmp_path / "s.keras")
    reloaded = kerasbn.load_model(path)
    assert set(bn_classes(reloaded)) == {kerasbn.BatchNormalization}
    assert_same_outputs(swapped, reloaded)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2"])
def test_keras_applications_round_trip(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    assert_round_trip(randomize_bn(model))


@pytest.mark.slow
def test_keras_hub_backbone_round_trip():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[2, 2, 2],
        stackwise_num_strides=[1, 2, 2],
        block_type="basic_block",
        image_shape=(32, 32, 3),
    )
    assert_round_trip(randomize_bn(backbone))


def test_original_and_swapped_models_train_side_by_side_on_jax():
    """On JAX a variable's value is an immutable device buffer: the swapped model must own
    its buffers, or a training step of one model (which donates them) deletes the other's."""
    code = (
        "import numpy as np, keras, kerasbn\n"
        "x = keras.Input((4,))\n"
        "m = keras.Model(x, keras.layers.Dense(2)(keras.layers.BatchNormalization()(keras.layers.Dense(3)(x))))\n"
        "s = kerasbn.swap(m).model\n"
        "for model in (m, s, m, s):\n"
        "    model.compile('sgd', 'mse')\n"
        "    model.train_on_batch(np.ones((4, 4), 'float32'), np.ones((4, 2), 'float32'))\n"
        "print('ok')\n"
    )
    import os
    import subprocess
    import sys

    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
