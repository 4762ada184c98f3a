"""The examples run and make their point: paper Figure 1 in a short version."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figure1(tmp_path_factory):
    out = tmp_path_factory.mktemp("figure1")
    module = load("paper_figure1")
    assert module.main(["--steps", "300", "--every", "50", "--out", str(out)]) == 0
    return module, out


@pytest.mark.slow
def test_figure1_writes_curves_for_both_networks(figure1):
    module, out = figure1
    assert (out / "figure1.png").stat().st_size > 10_000
    with open(out / "figure1.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == module.CURVE_COLUMNS
        rows = list(reader)
    for network in ("plain", "bn"):
        steps = [int(r["step"]) for r in rows if r["network"] == network]
        assert steps == list(range(0, 301, 50)), network


@pytest.mark.slow
def test_figure1_bn_trains_faster_and_at_30x_the_learning_rate(figure1):
    _, out = figure1
    with open(out / "learning_rates.csv") as f:
        table = {int(r["factor"]): r for r in csv.DictReader(f)}
    assert sorted(table) == [1, 5, 30]
    # At the base rate BN reaches 90% within 300 steps and the plain network does not.
    assert table[1]["bn_steps_to_target"] and not table[1]["plain_steps_to_target"]
    # At 30× the BN network still trains; the plain one stalls near chance (or diverges: NaN).
    bn, plain = float(table[30]["bn_accuracy"]), float(table[30]["plain_accuracy"])
    assert bn > 0.85
    assert np.isnan(plain) or plain < 0.3


def test_steps_to_target_takes_the_first_evaluation_at_or_above_it():
    module = load("paper_figure1")
    rows = [(0, 0.1), (50, 0.89), (100, 0.9), (150, 0.95)]
    assert module.steps_to(rows, 0.9) == 100
    assert module.steps_to(rows, 0.99) is None


# 53 s on 2 cores: the installed CLI's paths are also in tests/cli (make test); this runs in test-large.
@pytest.mark.large
@pytest.mark.slow
def test_demo_runs_the_installed_cli_and_all_six_models_agree(tmp_path):
    """`make demo` end to end, in a scratch directory (it writes build/demo/ under the cwd)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for command in ("$ kerasbn audit", "$ kerasbn fold", "$ kerasbn export", "--int8 --calibration"):
        assert command in done.stdout
    assert "predicted classes identical across the float models: yes" in done.stdout
    table = done.stdout.split("scoring on", 1)[1].splitlines()
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in table[3:] if line[:1].strip() and "ms" in line}
    assert sorted(rows) == sorted(
        ["original (Keras)", "folded (Keras)", "ONNX fp32", "ONNX int8", "LiteRT fp32", "LiteRT int8"]
    )
    floats = {label: row for label, row in rows.items() if "int8" not in label}
    assert len({row[0] for row in floats.values()}) == 1 and float(rows["original (Keras)"][0]) > 0.9
    for label in ("ONNX int8", "LiteRT int8"):
        assert float(rows[label][1].rstrip("%")) >= 99.0, rows[label]
        float_label = label.replace("int8", "fp32")
        assert float(rows[label][2]) <= 0.30 * float(rows[float_label][2]), (rows[label], rows[float_label])
    names = ("digits_cnn.keras", "digits_cnn.folded.keras", "digits_cnn.onnx", "digits_cnn.int8.onnx")
    for name in names + ("digits_cnn.tflite", "digits_cnn.int8.tflite"):
        assert (tmp_path / "build" / "demo" / name).is_file()


def test_plot_benchmarks_charts_every_configuration(tmp_path):
    import json

    runs = [
        {
            "backend": "tensorflow",
            "mode": mode,
            "shape": [4, 8],
            "dtype": "float32",
            "op": op,
            "impl": impl,
            "ms": ms,
            "copy_ms": 0.5,
            "ratio_to_keras": ms / 2.0,
            "bound_fraction": 0.5,
            "ratio_to_copy": ms / 0.5,
        }
        for mode in ("graph", "xla")
        for op in ("train", "infer")
        for impl, ms in (("kerasbn", 1.0), ("keras", 2.0))
    ]
    source = tmp_path / "layer.json"
    source.write_text(json.dumps({"machine": {"device": "cpu", "name": "test CPU", "cores": 2}, "runs": runs}))
    module = load("plot_benchmarks")
    assert module.configurations(runs, "train") == [
        ("tensorflow", "graph", (4, 8), "float32"),
        ("tensorflow", "xla", (4, 8), "float32"),
    ]
    out = tmp_path / "chart.png"
    assert module.main(["--json", str(source), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keras_hub_table_row_counts_every_bn():
    pytest.importorskip("keras_hub")
    module = load("keras_hub_table")
    name, layers, in_model, reported, folded, exported, _, error, stays = module.row("ResNet (vd)")
    assert name == "ResNet (vd)"
    assert int(in_model) == int(reported) > 0 and folded.startswith(f"{in_model} ")
    assert float(error) <= 1e-4 and stays == "—"
    verdict, onnx_error, left = exported.split(", ")
    assert verdict == "yes" and float(onnx_error) <= 1e-4 and left == "0 BN ops left"


def test_qat_table_gives_mean_and_worst_per_setting_and_the_plot_is_written(tmp_path):
    module = load("qat")
    rng = np.random.default_rng(0)
    results = {("float", ""): list(rng.uniform(0.9, 1.0, 3))}
    for setting in module.SETTINGS:
        for row in ("PTQ", "QAT"):
            results[row, setting.label] = list(rng.uniform(0.5, 1.0, 3))
    lines = module.table(results, 3).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:] if line.startswith("| ")}
    assert sorted(rows) == sorted(s.label for s in module.SETTINGS)
    for setting in module.SETTINGS:
        cells = rows[setting.label].strip("| ").split(" | ")[1:]
        for cell, key in zip(cells, [("float", ""), ("PTQ", setting.label), ("QAT", setting.label)]):
            values = results[key]
            assert cell == f"{np.mean(values):.3f} ({min(values):.3f})", (setting.label, key)
    out = tmp_path / "qat.png"
    module.plot(results, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.large
def test_qat_example_beats_ptq_at_3_bits_and_its_int8_files_score_what_the_qat_model_scores(tmp_path):
    """`examples/qat.py --quick` end to end (one seed): training, PTQ vs QAT, the CLI's int8 exports run."""
    import json

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "qat.py"), "--quick", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    accuracy = {(r["row"], r["setting"]): r["accuracy"][0] for r in results["accuracy"]}
    # 7 levels per channel: the folded weights as they are lose several points, trained onto the grid they
    # keep nearly all (the issue measured 0.77 against 0.98 over 4 seeds).
    assert accuracy["QAT", "3-bit per channel"] > accuracy["PTQ", "3-bit per channel"]
    assert accuracy["QAT", "8-bit per channel"] >= accuracy["float", ""] - 0.02
    scores = results["export"]
    for label in ("LiteRT int8", "ONNX int8"):
        # Within 2 output steps of the QAT model per logit: the class may change only on a near tie.
        assert scores[f"{label} same class, decisive"] == 1.0, label
        assert scores[f"{label} same class"] >= 0.99, label
        # Its accuracy differs from the QAT model's by at most the digits whose class changed (450 digits).
        changed = round(450 * (1 - scores[f"{label} same class"]))
        assert round(450 * abs(scores[label] - scores["QAT model (Keras)"])) <= changed, label
    for name in ("digits_dsnet.qat.keras", "digits_dsnet.int8.tflite", "digits_dsnet.int8.onnx", "qat_accuracy.png"):
        assert (tmp_path / name).is_file(), name
