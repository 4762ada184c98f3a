"""kerasbn.qat.prepare over the model kinds users have; convert gives back the folded model."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.errors import UnsupportedModelError
from kerasbn.qat import layers
from tests.folding.test_fold import BACKWARD
from tests.helpers import assert_same_outputs, randomize_biases, randomize_bn

L = keras.layers


def conv_block(x):
    x = L.Conv2D(4, 3, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    return L.ReLU()(x)


def sequential_with_input():
    return keras.Sequential(
        [keras.Input((8, 8, 2)), L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU(), L.Flatten(), L.Dense(3)]
    )


def sequential_without_input():
    model = keras.Sequential([L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU(), L.Flatten(), L.Dense(3)])
    model.build((None, 8, 8, 2))
    return model


def functional_residual():
    x = keras.Input((8, 8, 2))
    h = conv_block(x)
    r = L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same")(h))
    h = L.Add()([h, r])
    return keras.Model(x, L.Dense(3)(L.GlobalAveragePooling2D()(h)))


def nested():
    inner_in = keras.Input((8, 8, 2))
    inner = keras.Model(inner_in, conv_block(inner_in), name="block")
    x = keras.Input((8, 8, 2))
    return keras.Model(x, L.Dense(3)(L.Flatten()(inner(x))))


def multi_input():
    a, b = keras.Input((8, 8, 2), name="a"), keras.Input((5,), name="b")
    h = L.GlobalAveragePooling2D()(conv_block(a))
    g = L.BatchNormalization()(L.Dense(4)(b))
    return keras.Model({"a": a, "b": b}, L.Dense(3)(L.Concatenate()([h, g])))


def paper_bn():
    x = keras.Input((8, 8, 2))
    h = kerasbn.BatchNormalization(unbiased=True)(L.Conv2D(4, 3)(x))
    return keras.Model(x, L.Dense(3)(L.Flatten()(L.ReLU()(h))))


def nested_sequential():
    block = keras.Sequential([L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU()], name="block")
    x = keras.Input((8, 8, 2))
    return keras.Model(x, L.Dense(3)(L.Flatten()(block(x))))


KINDS = {
    "sequential_input": (sequential_with_input, 1),
    "sequential_built": (sequential_without_input, 1),
    "functional_residual": (functional_residual, 2),
    "nested": (nested, 1),
    "multi_input": (multi_input, 2),
    "kerasbn_bn": (paper_bn, 1),
    "nested_sequential": (nested_sequential, 1),
}


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_fuses_pairs_and_convert_gives_the_fold(kind):
    make, n_fused = KINDS[kind]
    keras.utils.set_random_seed(0)
    model = randomize_biases(randomize_bn(make()))
    qat = kerasbn.qat.prepare(model)
    assert len(layers.fused(qat)) == n_fused
    assert kerasbn.qat.is_qat(qat) and not kerasbn.qat.is_qat(model)
    # Every quantized layer reads a quantized tensor: there is an activation quantizer per model input.
    assert len(layers.activation_quantizers(qat)) >= len(keras.tree.flatten(model.inputs)) + 1
    # Without fake quant, the QAT model is the folded original.
    assert_same_outputs(model, kerasbn.qat.convert(qat))


@pytest.mark.parametrize("case", BACKWARD, ids=[c[0] for c in BACKWARD])
def test_every_fold_layout_converts_back(case):
    _, shape, make, axis = case
    keras.utils.set_random_seed(0)
    x = keras.Input(shape)
    model = randomize_biases(randomize_bn(keras.Model(x, L.BatchNormalization(axis=axis)(make()(x)))))
    qat = kerasbn.qat.prepare(model)
    fused = layers.fused(qat)
    if not fused:
        # Only transposed convolutions have no fused form; they say so.
        (flt,) = qat.qat_preparation.float_layers[:1]
        assert "no fused quantization-aware form" in flt.reason
        return
    assert_same_outputs(model, kerasbn.qat.convert(qat))


def test_quantized_inference_is_close_to_the_float_model():
    """The 8-bit model differs from the float one by quantization noise: a few output steps, no more."""
    keras.utils.set_random_seed(0)
    model = randomize_bn(functional_residual())
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 2)).astype(np.float32)
    qat = kerasbn.qat.prepare(model, calibration=x)
    y = model.predict(x, verbose=0)
    z = qat.predict(x, verbose=0)
    out = next(q for q in layers.activation_quantizers(qat) if q.name.startswith("dense"))
    step = float(keras.ops.convert_to_numpy(out.nudged_range()[2]))
    assert 0 < np.abs(z - y).max() <= 8 * step


def test_refusal_reasons():
    x = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, activation="relu")(x)  # fused activation: BN cannot fold
    h = L.BatchNormalization(name="after_relu")(h)
    h = L.Conv2DTranspose(3, 3, name="transpose")(h)
    h = L.BatchNormalization(name="after_transpose")(h)
    qat = kerasbn.qat.prepare(keras.Model(x, h))
    reasons = {f.layer: (f.code, f.reason) for f in qat.qat_preparation.float_layers}
    assert reasons["after_relu"][0] == "fused_activation"
    assert "no fused quantization-aware form" in reasons["after_transpose"][1]
    assert "no quantization-aware form" in reasons["transpose"][1]


def test_refuses_subclassed_and_mixed_precision():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    with pytest.raises(UnsupportedModelError, match="subclassed"):
        kerasbn.qat.prepare(net)
    x = keras.Input((3,))
    mixed = keras.Model(x, L.Dense(2, dtype="mixed_float16")(x))
    with pytest.raises(UnsupportedModelError, match="float32"):
        kerasbn.qat.prepare(mixed)


@pytest.mark.slow
def test_torch_backend_is_refused_with_the_reason():
    code = (
        "import keras, kerasbn\n"
        "x = keras.Input((3,))\n"
        "model = keras.Model(x, keras.layers.BatchNormalization()(keras.layers.Dense(2)(x)))\n"
        "try:\n"
        "    kerasbn.qat.prepare(model)\n"
        "except kerasbn.errors.UnsupportedModelError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": "torch"},
    )
    assert done.returncode == 0, done.stderr
    assert "TensorFlow and JAX backends" in done.stdout


def test_integer_inputs_stay_and_the_float_producer_gets_the_quantizer():
    ids = keras.Input((4,), dtype="int32", name="ids")
    h = L.Embedding(10, 3, name="embed")(ids)
    h = L.BatchNormalization(name="bn")(L.Dense(5, name="dense")(L.Flatten(name="flat")(h)))
    qat = kerasbn.qat.prepare(keras.Model(ids, h))
    names = [q.name for q in layers.activation_quantizers(qat)]
    # No quantizer on the token ids; the Dense reads the (float) embedding through one, after its producer.
    assert names == ["flat_quant", "dense_quant"]
    x = np.random.default_rng(0).integers(0, 10, size=(3, 4)).astype("int32")
    assert qat.predict(x, verbose=0).shape == (3, 5)
