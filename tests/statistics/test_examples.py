"""The population-statistics examples run and make their point."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.large
@pytest.mark.slow
def test_domain_shift_calibration_recovers_the_accuracy(tmp_path):
    results = load("domain_shift").main(["--out", str(tmp_path)])
    assert results["stale_layers"] == results["bn_layers"] == 2
    assert results["shifted"] < 0.5 < 0.9 < results["shifted_after_calibrate"]
    assert results["clean"] - results["shifted_after_calibrate"] < 0.05


@pytest.mark.large
@pytest.mark.slow
def test_lagging_statistics_fixed_by_paper_calibration(tmp_path):
    results = load("lagging_statistics").main(["--out", str(tmp_path)])
    assert results["stale_layers"] > 0
    # Calibrated on the final network: as good as batch statistics, far better than the lagging averages.
    assert results["calibrated"] > results["moving_statistics"] + 0.05
    assert abs(results["calibrated"] - results["batch_statistics"]) < 0.03
