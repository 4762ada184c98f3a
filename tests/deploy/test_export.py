"""`kerasbn.export`: one pipeline for every target — a failed check writes nothing, int8 and float share it."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy.export import ExportVerificationError
from kerasbn.deploy.target import Target, target_for, targets
from kerasbn.deploy.verify import Checks, Reference
from kerasbn.errors import KerasbnError
from tests.helpers import randomize_bn

RUNTIMES = {"onnx": "ONNX Runtime disagrees", "litert": "LiteRT interpreter disagrees"}


def _dense_bn() -> keras.Model:
    inputs = keras.Input((5,), name="x")
    return randomize_bn(keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))))


def test_every_registered_target_is_complete():
    found = targets()
    assert set(found) == set(RUNTIMES)
    for name, target in found.items():
        assert isinstance(target, Target) and target.name == name
        assert target_for(f"model{target.suffix.upper()}") is target


@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
def test_failed_check_writes_nothing(fmt, tmp_path, monkeypatch):
    real = Reference.judge

    def pessimist(*args):
        return tuple(dataclasses.replace(c, passed=False, max_abs_error=1.0) for c in real(*args))

    monkeypatch.setattr(Reference, "judge", pessimist)
    path = tmp_path / f"m{targets()[fmt].suffix}"
    with pytest.raises(ExportVerificationError, match=f"{RUNTIMES[fmt]}.*nothing written") as failure:
        kerasbn.export(_dense_bn(), path)
    assert not failure.value.result.verified
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
def test_the_reference_is_evaluated_once_per_case(fmt, tmp_path, monkeypatch):
    # The original model's outputs on the check inputs are computed once and reused for every judgement.
    calls = []
    real = kerasbn.deploy.outputs.keras_outputs

    def counting(model, inputs):
        calls.append(model)
        return real(model, inputs)

    model = _dense_bn()
    monkeypatch.setattr(kerasbn.deploy.outputs, "keras_outputs", counting)
    result = kerasbn.export(model, tmp_path / f"m{targets()[fmt].suffix}", checks=Checks(batch_sizes=(1, 3, 8)))
    assert [c.batch_size for c in result.checks] == [1, 3, 8] and result.verified
    assert len(calls) == 3 and all(m is model for m in calls)


def test_check_options_are_one_object():
    with pytest.raises(KerasbnError, match="at least one batch size"):
        Checks(batch_sizes=())
    sig = kerasbn.signature(_dense_bn())
    x = np.ones((5, 5), "float32")
    cases = Checks(inputs=x).cases(sig)
    assert [c[0].shape[0] for c in cases] == [5, 1]
    random = Checks(batch_sizes=(2, 4), seed=3).cases(sig)
    np.testing.assert_array_equal(random[1][0], sig.random(4, 4)[0])


def test_opset_is_an_onnx_option(tmp_path):
    with pytest.raises(KerasbnError, match="opset applies to ONNX only"):
        kerasbn.export(_dense_bn(), tmp_path / "m.tflite", opset=13)
    assert list(tmp_path.iterdir()) == []


def test_legacy_names_are_the_pipeline(tmp_path):
    model = _dense_bn()
    old = kerasbn.export_onnx(model, tmp_path / "a.onnx", batch_sizes=(2,), seed=1)
    new = kerasbn.export(model, tmp_path / "b.onnx", checks=Checks(batch_sizes=(2,), seed=1))
    assert old.op_counts == new.op_counts and [c.to_dict() for c in old.checks] == [c.to_dict() for c in new.checks]
    # (Sizes differ by a few bytes: the two conversions name their nodes after different layer counters.)
    assert old.op_counts_unfolded == new.op_counts_unfolded and old.passes == new.passes


def _small_cnn(policy: str, weights: list | None = None) -> keras.Model:
    """Conv → BN → ReLU → Flatten → Dense → BN under ``policy``, its outputs float32 (as Keras's guide advises)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(3)  # the kernels' initial values: the same network in any test order
    try:
        x = keras.Input((8, 8, 3), name="image")
        y = keras.layers.Conv2D(8, 3, use_bias=False)(x)
        y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
        y = keras.layers.BatchNormalization()(keras.layers.Dense(4)(keras.layers.Flatten()(y)))
        model = keras.Model(x, keras.layers.Activation("linear", dtype="float32")(y))
    finally:
        keras.config.set_dtype_policy(previous)
    if weights is None:
        return randomize_bn(model)
    model.set_weights(weights)
    return model


# Unit roundoff of the float type the file computes in.
ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11}


@pytest.mark.parametrize("dtype", [None, "float16"], ids=["default", "float16"])
@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_exports_float32_or_float16(policy, fmt, dtype, tmp_path):
    model = _small_cnn(policy)
    path = tmp_path / f"m{targets()[fmt].suffix}"
    result = kerasbn.export(model, path, dtype=dtype)
    written = dtype or "float32"
    assert result.verified and result.dtype == written
    assert (
        result.model_dtype == {"float32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}[policy]
    )

    # Judged here against the same network built in float64 (an independent reference, not the exporter's).
    exact = _small_cnn("float64", [w.astype("float64") for w in model.get_weights()])
    x = np.random.default_rng(11).normal(size=(5, 8, 8, 3)).astype("float32")
    truth = np.asarray(exact.predict_on_batch(x.astype("float64")), np.float64)
    got = np.asarray(targets()[fmt].runner(path, kerasbn.signature(model))([x])[0], np.float64)
    scale = float(np.max(np.abs(truth)))
    # Three layers, reductions over at most 8·36 + 288 terms: a few hundred roundings of the file's float type
    # (float16 weights: 16 roundings of each weight's relative size, far below a wrong fold's 1e-3).
    bound = (256 if written == "float32" else 16) * ROUNDOFF[written]
    assert float(np.max(np.abs(got - truth))) <= bound * scale


def test_dtype_and_int8_exclude_each_other(tmp_path):
    with pytest.raises(KerasbnError, match="exclude each other"):
        kerasbn.export(_dense_bn(), tmp_path / "m.onnx", int8=np.zeros((4, 5), "float32"), dtype="float16")
    with pytest.raises(KerasbnError, match="dtype must be one of"):
        kerasbn.export(_dense_bn(), tmp_path / "m.onnx", dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_int8_from_a_mixed_precision_model(policy, fmt, tmp_path):
    model = _small_cnn(policy)
    rows = np.random.default_rng(2).normal(size=(64, 8, 8, 3)).astype("float32")
    report = kerasbn.export(model, tmp_path / f"m{targets()[fmt].suffix}", int8=rows, min_agreement=0.0)
    assert report.float_export.dtype == "float32" and report.float_export.verified
    # int8 activations over three layers: within a few steps of 2·max|y|/255 of the float model.
    assert all(a.max_rel_error <= 0.1 for a in report.agreements)


@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
def test_a_file_the_runtime_cannot_run_is_one_clear_refusal(fmt, tmp_path, monkeypatch):
    target = targets()[fmt]

    def refuses(source, sig):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Type 'tensor(bfloat16)' of input parameter\nmore")

    monkeypatch.setattr(type(target), "runner", lambda self, source, sig: refuses(source, sig))
    with pytest.raises(kerasbn.errors.UnsupportedModelError, match=f"{target.runtime} cannot run.*INVALID_GRAPH"):
        kerasbn.export(_dense_bn(), tmp_path / f"m{target.suffix}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compare_unfolded", [False, True])
@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
def test_an_export_costs_one_conversion(fmt, compare_unfolded, tmp_path, monkeypatch):
    target = targets()[fmt]
    converted = []
    real = type(target).convert

    def counting(self, model, sig, **options):
        converted.append(model)
        return real(self, model, sig, **options)

    monkeypatch.setattr(type(target), "convert", counting)
    model = _dense_bn()
    result = kerasbn.export(model, tmp_path / f"m{target.suffix}", compare_unfolded=compare_unfolded)
    assert result.verified and len(converted) == 1 + compare_unfolded
    assert (result.op_counts_unfolded is not None) == compare_unfolded
    if compare_unfolded:
        # LiteRT's converter fuses a Dense → BN itself: never more ops after the fold.
        assert converted[0] is model and sum(result.op_counts_unfolded.values()) >= sum(result.op_counts.values())
