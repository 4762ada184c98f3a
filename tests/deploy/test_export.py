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
        kerasbn.export(_dense_bn(), path, compare_unfolded=False)
    assert not failure.value.result.verified
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
def test_the_reference_is_evaluated_once_per_case(fmt, tmp_path, monkeypatch):
    # The original model's outputs on the check inputs are computed once and reused for every judgement.
    calls = []
    real = kerasbn.deploy.verify.keras_outputs

    def counting(model, inputs):
        calls.append(model)
        return real(model, inputs)

    model = _dense_bn()
    monkeypatch.setattr(kerasbn.deploy.verify, "keras_outputs", counting)
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
    assert old.size == new.size and old.op_counts_unfolded == new.op_counts_unfolded
