"""`kerasbn qat` on saved files, and `kerasbn audit` of the QAT file it writes."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.qat import layers
from tests.cli.conftest import assert_clean_error, digest, invoke, run_script


def test_qat_writes_a_trainable_file_and_audit_lists_its_quantizers(model_files, copy_of, tmp_path):
    model = copy_of(model_files["keras"])
    before = digest(model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.random.default_rng(0).normal(size=(16, 6, 6, 2)).astype(np.float32))
    result = invoke("qat", model, "--calibration", calib, "--weight-bits", "4", "--per-tensor")
    assert result.exit_code == 0, result.output
    out = model.with_name("tiny.qat.keras")
    assert out.exists() and digest(model) == before
    qat = keras.saving.load_model(out, safe_mode=True)
    fused = layers.fused(qat)
    assert [f.name for f in fused] == ["conv", "dense"]
    assert all(f.weight_bits == 4 and not f.per_channel for f in fused)
    # The ranges come from the calibration data, not the defaults.
    first = layers.activation_quantizers(qat)[0]
    x = np.load(calib)["image"]
    assert float(keras.ops.convert_to_numpy(first.range_min)) == pytest.approx(float(x.min()))
    audit = invoke("audit", out, "--format", "json")
    assert audit.exit_code == 0, audit.output
    rows = json.loads(audit.output)["qat"]["quantizers"]
    assert {(r["layer"], r["kind"], r["bits"]) for r in rows if r["kind"] == "weights"} == {
        ("conv", "weights", 4),
        ("dense", "weights", 4),
    }
    assert sum(r["kind"] == "activation" for r in rows) == len(layers.activation_quantizers(qat))


def test_qat_json_reports_what_stays_float(tmp_path):
    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    path = tmp_path / "m.keras"
    keras.Model(x, h).save(path)
    result = invoke("qat", path, "-o", tmp_path / "out.keras", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["float_layers"][0]["layer"] == "bn"
    assert report["float_layers"][0]["code"] == "fused_activation"
    assert report["verified"]["passed"] is True


def test_qat_bad_inputs_exit_2(model_files, tmp_path):
    result = invoke("qat", tmp_path / "missing.keras")
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    bad = tmp_path / "calib.npz"
    np.savez(bad, image=np.zeros((4, 5, 5, 2), np.float32))
    result = invoke("qat", model_files["keras"], "-o", tmp_path / "q.keras", "--calibration", bad)
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "calib.npz" in result.stderr
    assert not (tmp_path / "q.keras").exists()
    result = invoke("qat", model_files["keras"], "-o", tmp_path / "q.keras", "--weight-bits", "9")
    assert result.exit_code == 2


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the subprocess runs the default backend")
def test_installed_script_prepares_and_the_file_loads_after_import_kerasbn(model_files, tmp_path):
    out = tmp_path / "tiny.qat.keras"
    done = run_script("qat", model_files["keras"], "-o", out, "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert kerasbn.qat.is_qat(kerasbn.load_model(out))
