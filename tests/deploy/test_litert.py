"""`kerasbn.export` to LiteRT: every layer/BN pair comes out of the fold with no MUL/ADD left from the BN,
and the LiteRT interpreter agrees with Keras at two batch sizes, and at a third one checked here."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy import litert
from kerasbn.deploy.runtime import litert_interpreter, litert_runner
from kerasbn.deploy.verify import keras_outputs
from kerasbn.errors import KerasbnError, UnsupportedModelError
from tests.helpers import randomize_biases, randomize_bn

BN = keras.layers.BatchNormalization
PAIRS = {
    "dense_bn": ((5,), [lambda: keras.layers.Dense(4, use_bias=False), BN]),
    "conv1d_bn": ((10, 3), [lambda: keras.layers.Conv1D(4, 3), BN]),
    "conv2d_bn": ((6, 6, 3), [lambda: keras.layers.Conv2D(4, 3), BN]),
    "conv2dtranspose_bn": ((5, 5, 3), [lambda: keras.layers.Conv2DTranspose(4, 3), BN]),
    "depthwise_multiplier2_bn": ((6, 6, 3), [lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), BN]),
    "separable_bn": ((6, 6, 3), [lambda: keras.layers.SeparableConv2D(4, 3, depth_multiplier=2), BN]),
    "bn_conv2d_valid": ((6, 6, 3), [BN, lambda: keras.layers.Conv2D(4, 3, padding="valid")]),
    "bn_dense": ((5,), [BN, lambda: keras.layers.Dense(4)]),
}


def _model(shape, layers, *, with_bn: bool = True) -> keras.Model:
    inputs = keras.Input(shape, name="x")
    y = inputs
    for make in layers:
        layer = make()
        if not with_bn and hasattr(layer, "use_bias"):
            layer.use_bias = True  # a folded partner carries a bias: the reference graph must too
        if with_bn or not isinstance(layer, BN):
            y = layer(y)
    return randomize_biases(randomize_bn(keras.Model(inputs, y)))


def _max_error(model, path, batch: int, seed: int) -> tuple[float, float]:
    """max |LiteRT − Keras| and max |Keras| on fresh inputs, run here, not by the exporter."""
    x = np.random.default_rng(seed).standard_normal((batch, *model.inputs[0].shape[1:])).astype("float32")
    expected = keras_outputs(model, x)[0]
    got = litert_runner(path, kerasbn.signature(model).names)([x])[0]
    assert got.shape == expected.shape
    return float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected)))


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_export_folds_every_pair(pair, tmp_path):
    shape, layers = PAIRS[pair]
    model = _model(shape, layers)
    path = tmp_path / f"{pair}.tflite"

    result = kerasbn.export_litert(model, path, compare_unfolded=True)

    assert result.verified and [c.batch_size for c in result.checks] == [1, 8]
    assert result.fold_report.to_dict()["totals"]["folded"] == 1
    error, scale = _max_error(model, path, batch=13, seed=7)
    assert error <= 1e-4 * scale, (error, scale)
    # Whatever MUL/ADD remain, the same graph without a BN has them too.
    without_bn = litert.op_counts(litert.to_litert(_model(shape, layers, with_bn=False)))
    for op in ("MUL", "ADD", "SUB"):
        assert result.op_counts.get(op, 0) <= without_bn.get(op, 0), (op, result.op_counts, without_bn)
    assert result.op_counts == litert.op_counts(path.read_bytes())
    assert result.size == path.stat().st_size and result.size_unfolded > 0


@pytest.mark.slow
def test_kerasbn_batch_normalization_leaves_mul_and_add_unless_folded(tmp_path):
    # The converter fuses Keras's own BN into some convolutions; kerasbn's layer
    # it cannot recognize, so there the fold is what removes the arithmetic.
    inputs = keras.Input((6, 6, 3))
    y = kerasbn.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs))
    model = randomize_bn(keras.Model(inputs, y))
    result = kerasbn.export_litert(model, tmp_path / "m.tflite", compare_unfolded=True)
    assert result.op_counts_unfolded.get("MUL", 0) >= 1 and result.op_counts_unfolded.get("ADD", 0) >= 1
    assert "MUL" not in result.op_counts and "ADD" not in result.op_counts
    assert result.op_counts["CONV_2D"] == 1


def test_batch_dimension_is_dynamic(tmp_path):
    model = _model(*PAIRS["conv1d_bn"])
    path = tmp_path / "m.tflite"
    kerasbn.export_litert(model, path)
    details = litert_interpreter(path.read_bytes()).get_input_details()
    assert list(details[0]["shape_signature"]) == [-1, 10, 3]
    for batch in (1, 5):
        error, scale = _max_error(model, path, batch, seed=batch)
        assert error <= 1e-4 * scale


class _Inverse(keras.layers.Layer):
    """A matrix inverse: TensorFlow has it, LiteRT's builtin ops do not."""

    def call(self, x):
        return keras.ops.reshape(keras.ops.inv(keras.ops.reshape(x, (-1, 2, 2))), (-1, 4))


def test_a_model_the_converter_rejects_writes_nothing(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, _Inverse()(keras.layers.Dense(4)(inputs)))
    with pytest.raises(UnsupportedModelError, match="LiteRT converter rejects the model: 'tf.MatrixInverse'"):
        kerasbn.export_litert(model, tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_no_fold_given_inputs_and_existing_output(tmp_path):
    model = _model(*PAIRS["dense_bn"])
    path = tmp_path / "m.tflite"
    x = np.random.default_rng(5).standard_normal((6, 5)).astype("float32")
    result = kerasbn.export_litert(model, path, fold=False, inputs=x)
    assert result.op_counts_unfolded is None and result.fold_report is None
    assert [c.batch_size for c in result.checks] == [6, 1] and result.verified
    assert result.to_dict()["format"] == "litert"
    first = path.read_bytes()
    with pytest.raises(KerasbnError, match="already exists"):
        kerasbn.export_litert(model, path)
    assert path.read_bytes() == first
    assert kerasbn.export_litert(model, path, overwrite=True, verify=False).checks == ()


def test_multi_input_multi_output_keep_their_order(tmp_path):
    a = keras.Input((5,), name="b_second")  # named so that sorting the names would swap them
    b = keras.Input((3,), name="a_first")
    x = BN()(keras.layers.Dense(4, use_bias=False)(a))
    model = randomize_bn(keras.Model([a, b], {"y": keras.layers.Concatenate()([x, b]), "x": x}))
    path = tmp_path / "m.tflite"
    result = kerasbn.export_litert(model, path)
    assert result.verified
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((3, 5)).astype("float32"), rng.standard_normal((3, 3)).astype("float32")]
    got = litert_runner(path, kerasbn.signature(model).names)(arrays)
    for y, z in zip(keras_outputs(model, arrays), got):
        np.testing.assert_allclose(z, y, rtol=1e-4, atol=1e-4 * np.max(np.abs(y)))


def test_float64_inputs_are_cast_like_keras_casts_them(tmp_path):
    model = _model(*PAIRS["dense_bn"])
    x = np.random.default_rng(4).standard_normal((3, 5))  # float64, as np.savez keeps it
    result = kerasbn.export_litert(model, tmp_path / "m.tflite", inputs=x)
    assert result.verified and [c.batch_size for c in result.checks] == [3, 1]
