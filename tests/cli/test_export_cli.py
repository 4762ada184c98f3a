"""`kerasbn export`: the op table, the ONNX Runtime checks, exit codes and files."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest

import kerasbn.deploy.onnx as onnx_export
from tests.cli.conftest import assert_clean_error, invoke, listing, run_script


def test_export_prints_the_op_table_and_writes_beside_the_input(model_files, copy_of):
    source = copy_of(model_files["keras"])
    result = invoke("export", source)
    assert result.exit_code == 0, result.stderr
    output = source.with_name("tiny.onnx")
    assert listing(source.parent) == {"tiny.keras", "tiny.onnx"}
    for text in ("Before fold", "After fold", "Total", "Model size", "batch 1", "batch 8", f"Wrote {output}"):
        assert text in result.stdout
    ops = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert "BatchNormalization" not in ops


def test_export_without_fold_and_verify(model_files, tmp_path):
    result = invoke(
        "export", model_files["keras"], "-o", tmp_path / "m.onnx", "--no-fold", "--no-verify", "--opset", "13"
    )
    assert result.exit_code == 0, result.stderr
    assert "Before fold" not in result.stdout and "Not verified" in result.stdout
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 13


def test_export_failed_check_exits_1_and_writes_nothing(model_files, tmp_path, monkeypatch):
    real = onnx_export._check_with_onnxruntime

    def pessimist(*args):
        return tuple(dataclasses.replace(c, passed=False, max_abs_error=1.0) for c in real(*args))

    monkeypatch.setattr(onnx_export, "_check_with_onnxruntime", pessimist)
    result = invoke("export", model_files["keras"], "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "ONNX Runtime disagrees with Keras" in result.stderr
    assert listing(tmp_path) == set()


def test_export_checks_at_the_given_batch_and_tolerances(model_files, tmp_path, monkeypatch):
    seen = {}
    real = onnx_export.export_onnx

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", spy)
    args = ("-o", tmp_path / "m.onnx", "--batch", "3", "--atol", "1e-3", "--rtol", "1e-2")
    result = invoke("export", model_files["keras"], *args)
    assert result.exit_code == 0, result.stderr
    assert (list(seen["batch_sizes"]), seen["atol"], seen["rtol"]) == ([1, 3], 1e-3, 1e-2)
    assert "batch 3" in result.stdout and "batch 8" not in result.stdout


def test_export_json_and_batch_one_checks_batch_one_only(model_files, tmp_path):
    result = invoke("export", model_files["keras"], "-o", tmp_path / "m.onnx", "--batch", "1", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [c["batch_size"] for c in data["checks"]] == [1]
    assert data["verified"] and data["fold"]["totals"]["folded"] == 2
    assert sum(data["op_counts"].values()) < sum(data["op_counts_unfolded"].values())


def test_export_refuses_existing_output(model_files, tmp_path):
    output = tmp_path / "m.onnx"
    output.write_bytes(b"keep")
    result = invoke("export", model_files["keras"], "-o", output)
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert output.read_bytes() == b"keep"
    assert invoke("export", model_files["keras"], "-o", output, "--force", "-q").exit_code == 0
    assert output.read_bytes() != b"keep"


@pytest.mark.slow
def test_installed_script_exports(model_files, tmp_path):
    done = run_script("export", model_files["keras"], "-o", tmp_path / "m.onnx")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "After fold" in done.stdout


@pytest.mark.slow
def test_export_on_another_backend_is_one_clear_line(model_files, tmp_path):
    done = run_script("export", model_files["keras"], "-o", tmp_path / "m.onnx", env={"KERAS_BACKEND": "jax"})
    assert_clean_error(done.returncode, done.stdout, done.stderr)
    assert "KERAS_BACKEND=tensorflow" in done.stderr
    assert listing(tmp_path) == set()
