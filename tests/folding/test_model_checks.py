"""`kerasbn.folding.model_checks`: models Keras builds but cannot run, and weights no model should hold,
named by layer before any arithmetic; the audit lists the weights, fold and export refuse them."""

from __future__ import annotations

import json
import re
import warnings

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.errors import KerasbnError, UnsupportedModelError
from kerasbn.folding.model_checks import check_runnable, check_weights, weight_problems
from tests.helpers import randomize_bn

L = keras.layers


def _convnet(dtype: str = "float32", bn_dtype: str | None = None) -> keras.Model:
    x = keras.Input((6, 6, 2), dtype=dtype, name="image")
    y = L.BatchNormalization(name="bn", dtype=bn_dtype)(L.Conv2D(3, 3, name="conv")(x))
    return randomize_bn(keras.Model(x, L.Dense(2, name="head")(L.Flatten()(y))))


def _listed_twice() -> keras.Model:
    # A config listing one input twice (as a hand-edited file can) loads into such a model.
    model = _convnet()
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))
    config["config"]["input_layers"] = [config["config"]["input_layers"]] * 2
    return keras.saving.deserialize_keras_object(config)


def _string_into_dense() -> keras.Model:
    # A Flatten whose dtype a hand-edited config set to "string" hands the Dense strings.
    x = keras.Input((3, 2), name="image")
    return keras.Model(x, L.Dense(2, name="head")(L.Flatten(dtype="string")(x)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _convnet("int32"), "layer 'conv' (Conv2D) reads a tensor of dtype int32"),
        (lambda: _convnet("bool"), "layer 'conv' (Conv2D) reads a tensor of dtype bool"),
        (lambda: _convnet("string"), "layer 'conv' (Conv2D) reads a tensor of dtype string"),
        (
            lambda: _convnet(bn_dtype="int4_from_float32"),
            "layer 'bn' (BatchNormalization) has the quantized dtype policy 'int4_from_float32'",
        ),
        (lambda: _convnet(bn_dtype="bool"), "layer 'bn' (BatchNormalization) has the dtype policy 'bool'"),
        (lambda: _convnet(bn_dtype="int32"), "layer 'bn' (BatchNormalization) has the dtype policy 'int32'"),
        (_listed_twice, "lists the input 'image' more than once"),
        (_string_into_dense, "layer 'head' (Dense) reads a tensor of dtype string"),
    ],
    ids=[
        "int32-into-conv",
        "bool-into-conv",
        "string-into-conv",
        "int4-bn",
        "bool-bn",
        "int32-bn",
        "input-twice",
        "string-into-dense",
    ],
)
def test_a_model_that_cannot_run_is_refused_naming_the_layer(make, message):
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        check_runnable(make())


def _int_into_dense() -> keras.Model:
    x = keras.Input((5,), dtype="int32")
    return keras.Model(x, L.BatchNormalization()(L.Dense(3)(x)))


def _embedding() -> keras.Model:
    x = keras.Input((7,), dtype="int32")
    h = L.Embedding(20, 4)(x)
    return keras.Model(x, L.BatchNormalization()(L.Conv1D(3, 2)(h)))


def _quantized_dense() -> keras.Model:
    model = _int_into_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "InputLayer does not have a `quantize` method"
        model.quantize("int8")
    return model


@pytest.mark.parametrize("make", [_convnet, _int_into_dense, _embedding, _quantized_dense])
def test_models_keras_runs_pass(make):
    model = make()
    check_runnable(model)
    inputs = np.ones((1, *model.inputs[0].shape[1:]), model.inputs[0].dtype)
    assert np.isfinite(np.asarray(model(inputs))).all()  # Keras runs them, so kerasbn must not refuse them


def _spoil(model: keras.Model, layer: str, weight: str, value: float) -> keras.Model:
    (variable,) = [v for v in model.get_layer(layer).weights if v.path.endswith(f"/{weight}")]
    values = np.asarray(variable).copy()
    values.reshape(-1)[1] = value
    variable.assign(values)
    return model


SPOILED = [
    ("conv", "kernel", np.nan, "1 NaN among its 54 values"),
    ("head", "bias", np.inf, "1 infinite among its 2 values"),
    ("bn", "gamma", -np.inf, "1 infinite among its 3 values"),
    ("bn", "moving_variance", -0.25, "1 negative among its 3 values (the lowest -0.25)"),
]


@pytest.mark.parametrize(("layer", "weight", "value", "problem"), SPOILED)
def test_weight_problems_name_layer_weight_and_what(layer, weight, value, problem):
    model = _spoil(_convnet(), layer, weight, value)

    (found,) = weight_problems(model)

    assert (found.layer, found.weight, found.problem) == (layer, weight, problem)


def test_a_negative_value_is_a_problem_only_in_a_variance():
    model = _spoil(_spoil(_convnet(), "bn", "gamma", -2.0), "bn", "moving_mean", -3.0)
    assert weight_problems(model) == []
    check_weights(model)


@pytest.mark.parametrize(("layer", "weight", "value", "problem"), SPOILED)
def test_fold_and_export_refuse_before_any_arithmetic(tmp_path, layer, weight, value, problem):
    model = _spoil(_convnet(), layer, weight, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # NumPy's "invalid value encountered" would raise here
        with pytest.raises(KerasbnError, match=re.escape(f"layer '{layer}': weight '{weight}' holds {problem};")):
            kerasbn.fold(model)
        with pytest.raises(KerasbnError, match=f"layer '{layer}': weight '{weight}'"):
            kerasbn.export(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_audit_lists_every_problem_in_each_form():
    model = _spoil(_spoil(_convnet(), "conv", "kernel", np.nan), "bn", "moving_variance", -1.0)

    report = kerasbn.audit(model)

    assert [(p.layer, p.weight) for p in report.weight_problems] == [("conv", "kernel"), ("bn", "moving_variance")]
    assert report.to_dict()["weight_problems"][1] == {
        "layer": "bn",
        "weight": "moving_variance",
        "problem": "1 negative among its 3 values (the lowest -1)",
    }
    assert "Weights that cannot be right" in report.to_markdown() and "moving_variance" in str(report)
    assert kerasbn.audit(_convnet()).weight_problems == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_weight_problems_in_every_float_type(dtype):
    x = keras.Input((3,))
    model = keras.Model(x, L.Dense(4, name="head", dtype=dtype)(x))
    assert model.get_layer("head").kernel.dtype == dtype

    (found,) = weight_problems(_spoil(model, "head", "kernel", np.inf))

    assert (found.layer, found.weight, found.problem) == ("head", "kernel", "1 infinite among its 12 values")
