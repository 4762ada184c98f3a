"""`kerasbn.export_onnx`: every layer/BN pair that tf2onnx leaves half-folded
comes out of our fold with no BatchNormalization and no Mul/Add left from it,
and ONNX Runtime agrees with Keras at two batch sizes."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import onnx
import pytest

import kerasbn
from kerasbn.deploy.onnx import ExportVerificationError, op_counts, to_onnx
from kerasbn.errors import KerasbnError


def _randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """Non-trivial BN statistics and biases, so a leftover Mul/Add cannot be optimized away as identity."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "use_bias", False) and not isinstance(layer, keras.layers.BatchNormalization):
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape).astype("float32"))
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = (w.shape for w in layer.weights)
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma).astype("float32"),
                    rng.normal(0, 0.5, beta).astype("float32"),
                    rng.normal(0, 0.5, mean).astype("float32"),
                    rng.uniform(0.5, 2.0, variance).astype("float32"),
                ]
            )
    return model


def _model(shape, layers, *, with_bn: bool = True) -> keras.Model:
    inputs = keras.Input(shape, name="x")
    y = inputs
    for make in layers:
        layer = make()
        if not with_bn and hasattr(layer, "use_bias"):
            layer.use_bias = True  # a folded partner carries a bias: the reference graph must too
        if with_bn or not isinstance(layer, keras.layers.BatchNormalization):
            y = layer(y)
    return _randomize(keras.Model(inputs, y))


BN = keras.layers.BatchNormalization
PAIRS = {
    "dense_bn": ((5,), [lambda: keras.layers.Dense(4, use_bias=False), BN]),
    "conv1d_bn": ((10, 3), [lambda: keras.layers.Conv1D(4, 3), BN]),
    "conv2dtranspose_bn": ((5, 5, 3), [lambda: keras.layers.Conv2DTranspose(4, 3), BN]),
    "depthwise_multiplier2_bn": ((6, 6, 3), [lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), BN]),
    # A 4×4 output with 4 filters: there Keras 3.15's eager channels_first Conv2D on CPU adds
    # its bias along the wrong axis; the export compares with Keras's compiled predict path.
    "conv2d_channels_first_bn": (
        (3, 6, 6),
        [lambda: keras.layers.Conv2D(4, 3, data_format="channels_first"), lambda: BN(axis=1)],
    ),
    "bn_conv2d": ((6, 6, 3), [BN, lambda: keras.layers.Conv2D(4, 3, padding="valid")]),
    "bn_dense": ((5,), [BN, lambda: keras.layers.Dense(4)]),
    "conv2d_bn": ((6, 6, 3), [lambda: keras.layers.Conv2D(4, 3), BN]),
}
# The pairs for which tf2onnx on its own leaves a Mul and an Add behind.
HALF_FOLDED_BY_TF2ONNX = set(PAIRS) - {"conv2d_bn"}


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_export_folds_every_pair(pair, tmp_path):
    shape, layers = PAIRS[pair]
    model = _model(shape, layers)
    without_bn = op_counts(to_onnx(_model(shape, layers, with_bn=False)))

    result = kerasbn.export_onnx(model, tmp_path / f"{pair}.onnx")

    assert result.verified
    assert [c.batch_size for c in result.checks] == [1, 8]
    assert result.fold_report.to_dict()["totals"]["folded"] == 1
    after = result.op_counts
    assert "BatchNormalization" not in after
    # Whatever Mul/Add remain, the same model without a BN has them too.
    assert after.get("Mul", 0) <= without_bn.get("Mul", 0), (after, without_bn)
    assert after.get("Add", 0) <= without_bn.get("Add", 0), (after, without_bn)
    before = result.op_counts_unfolded
    if pair in HALF_FOLDED_BY_TF2ONNX:
        # tf2onnx alone leaves the BN as a Mul and an Add (a partner without a bias gains one Add back).
        assert before.get("Mul", 0) >= 1 and before.get("Add", 0) >= 1, before
        assert before["Mul"] + before["Add"] > after.get("Mul", 0) + after.get("Add", 0), (before, after)
    onnx.checker.check_model(str(tmp_path / f"{pair}.onnx"))
    assert result.size == (tmp_path / f"{pair}.onnx").stat().st_size and result.size_unfolded > 0


@pytest.mark.slow
def test_batch_dimension_is_dynamic_and_outputs_match(tmp_path):
    model = _model((10, 3), PAIRS["conv1d_bn"][1])
    path = tmp_path / "m.onnx"
    kerasbn.export_onnx(model, path)
    graph = onnx.load(str(path)).graph
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((13, 10, 3)).astype("float32")
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], model(x), rtol=1e-4, atol=1e-5)


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    import kerasbn.deploy.onnx as export

    model = _model((5,), PAIRS["dense_bn"][1])
    real = export._check_with_onnxruntime

    def pessimist(*args):
        return tuple(dataclasses.replace(c, passed=False, max_abs_error=1.0) for c in real(*args))

    monkeypatch.setattr(export, "_check_with_onnxruntime", pessimist)
    with pytest.raises(ExportVerificationError, match="nothing written") as failure:
        kerasbn.export_onnx(model, tmp_path / "m.onnx")
    assert not failure.value.result.verified
    assert list(tmp_path.iterdir()) == []


def test_no_fold_and_existing_output(tmp_path):
    model = _model((5,), PAIRS["dense_bn"][1])
    path = tmp_path / "m.onnx"
    result = kerasbn.export_onnx(model, path, fold=False, opset=13)
    assert result.opset == 13 and result.op_counts_unfolded is None and result.fold_report is None
    assert result.op_counts.get("Mul", 0) >= 1  # tf2onnx's half-fold of Dense → BN
    first = path.read_bytes()
    with pytest.raises(KerasbnError, match="already exists"):
        kerasbn.export_onnx(model, path)
    assert path.read_bytes() == first
    assert kerasbn.export_onnx(model, path, overwrite=True, verify=False).checks == ()


def test_multi_input_multi_output(tmp_path):
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    x = BN()(keras.layers.Dense(4, use_bias=False)(a))
    model = _randomize(keras.Model({"a": a, "b": b}, {"y": keras.layers.Concatenate()([x, b]), "x": x}))
    result = kerasbn.export_onnx(model, tmp_path / "m.onnx")
    assert result.verified and "BatchNormalization" not in result.op_counts
