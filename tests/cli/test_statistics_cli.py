"""`kerasbn calibrate`, `kerasbn swap` and `kerasbn audit --data` from the command line."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.folding import plan
from tests.cli.conftest import assert_clean_error, digest, invoke, listing


@pytest.fixture
def work(tmp_path, model_files):
    """A copy of the tiny model and 40 samples of data beside it."""
    model = tmp_path / "tiny.keras"
    model.write_bytes(model_files["keras"].read_bytes())
    x = np.random.default_rng(0).normal(1.0, 2.0, (40, 6, 6, 2)).astype("float32")
    np.save(tmp_path / "data.npy", x)
    return tmp_path, model, x


def stats(model: keras.Model) -> list[np.ndarray]:
    return [
        np.asarray(w)
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if plan.is_bn(layer)
        for w in (layer.moving_mean, layer.moving_variance)
    ]


@pytest.mark.parametrize("mode", ["sequential", "paper"])
def test_calibrate_writes_what_the_library_computes(work, mode):
    folder, model, x = work
    before = digest(model)
    result = invoke("calibrate", model, "--data", folder / "data.npy", "--mode", mode, "-o", folder / "out.keras")
    assert result.exit_code == 0, result.output
    assert "Outputs moved: max |Δ|" in result.stdout and "Wrote" in result.stdout
    assert digest(model) == before
    expected = kerasbn.calibrate(kerasbn.load_model(model), x, mode=mode).model
    for a, b in zip(stats(kerasbn.load_model(folder / "out.keras")), stats(expected)):
        np.testing.assert_array_equal(a, b)


def test_calibrate_json(work):
    folder, model, _ = work
    result = invoke("calibrate", model, "--data", folder / "data.npy", "--format", "json", "--batch-size", "8")
    data = json.loads(result.stdout)
    assert data["calibration"]["batch_size"] == 8 and data["calibration"]["passes"] == 2
    assert data["outputs_moved"]["max_abs_error"] > 0
    assert (folder / "tiny.calibrated.keras").exists()


def _bad_data(folder):
    np.save(folder / "shape.npy", np.zeros((4, 5, 5, 2), "float32"))
    np.save(folder / "dtype.npy", np.full((4, 6, 6, 2), "x"))
    np.save(folder / "one.npy", np.ones((1, 6, 6, 2), "float32"))
    (folder / "empty").mkdir()
    return {
        "wrong_shape": (folder / "shape.npy", "the model expects"),
        "wrong_dtype": (folder / "dtype.npy", "must be numbers"),
        "too_few_samples": (folder / "one.npy", "too few samples"),
        "empty_folder": (folder / "empty", "holds no images"),
        "missing": (folder / "missing.npz", "no such file"),
    }


@pytest.mark.parametrize("case", ["wrong_shape", "wrong_dtype", "too_few_samples", "empty_folder", "missing"])
def test_calibrate_bad_data_is_one_line_and_writes_nothing(work, case):
    folder, model, _ = work
    path, message = _bad_data(folder)[case]
    before = listing(folder)
    result = invoke("calibrate", model, "--data", path, "-o", folder / "out.keras")
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert message in result.stderr
    assert listing(folder) == before


def test_calibrate_needs_data(work):
    folder, model, _ = work
    result = invoke("calibrate", model)
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "--data" in result.stderr


def test_calibrate_refuses_to_overwrite_the_input(work):
    folder, model, _ = work
    result = invoke("calibrate", model, "--data", folder / "data.npy", "-o", model, "--force")
    assert_clean_error(result.exit_code, result.stdout, result.stderr)


def test_audit_with_data_flags_stale_statistics(work):
    folder, model, _ = work
    result = invoke("audit", model, "--data", folder / "data.npy", "--format", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    stale = data["statistics"]
    assert stale["totals"]["stale"] == 2  # tiny_model's statistics are random
    assert stale["verdict"] == "2 BN layers have stale statistics; run kerasbn calibrate"
    assert all(isinstance(b["mean_shift"], float) for b in stale["batch_norms"])
    table = invoke("audit", model, "--data", folder / "data.npy")
    assert "stale statistics; run kerasbn calibrate" in table.stdout
    assert invoke("audit", model, "--data", folder / "data.npy", "--strict", "-q").exit_code == 1


def test_audit_after_calibrate_is_clean(work):
    folder, model, _ = work
    invoke("calibrate", model, "--data", folder / "data.npy", "-o", folder / "cal.keras")
    data = json.loads(invoke("audit", folder / "cal.keras", "--data", folder / "data.npy", "--format", "json").stdout)
    assert data["statistics"]["totals"]["stale"] == 0


def test_audit_without_data_is_unchanged(work):
    folder, model, _ = work
    data = json.loads(invoke("audit", model, "--format", "json").stdout)
    assert "statistics" not in data


def test_audit_bad_data(work):
    folder, model, _ = work
    path, message = _bad_data(folder)["wrong_shape"]
    result = invoke("audit", model, "--data", path)
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert message in result.stderr


def test_swap_round_trip(work):
    folder, model, x = work
    there, back = folder / "there.keras", folder / "back.keras"
    result = invoke("swap", model, "-o", there)
    assert result.exit_code == 0, result.output
    assert "2 BN layers swapped to kerasbn.BatchNormalization" in result.stdout
    assert invoke("swap", there, "--to", "keras", "-o", back).exit_code == 0
    original, returned = kerasbn.load_model(model), kerasbn.load_model(back)
    assert {type(layer) for layer in kerasbn.load_model(there).layers if plan.is_bn(layer)} == {
        kerasbn.BatchNormalization
    }
    for a, b in zip(original.weights, returned.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(original.predict_on_batch(x), returned.predict_on_batch(x))


def test_swap_json(work):
    folder, model, _ = work
    data = json.loads(invoke("swap", model, "--unbiased", "--format", "json").stdout)
    assert data["swap"]["totals"] == {"swapped": 2, "stayed": 0}
    assert data["verification"]["reloaded"]["passed"]
    assert (folder / "tiny.kerasbn.keras").exists()


def test_calibrate_from_a_folder_of_images(tmp_path):
    from PIL import Image

    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(2, 3, name="conv")(inputs))
    path = tmp_path / "m.keras"
    keras.Model(inputs, x).save(path)
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (5, 10, 12, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(images / f"{i}.png")
    no_size = invoke("calibrate", path, "--data", images, "-o", tmp_path / "out.keras")
    assert_clean_error(no_size.exit_code, no_size.stdout, no_size.stderr)
    assert "--image-size" in no_size.stderr
    done = invoke("calibrate", path, "--data", images, "--image-size", "10x12", "-o", tmp_path / "out.keras")
    assert done.exit_code == 0, done.output
    expected = kerasbn.calibrate(kerasbn.load_model(path), pixels.astype("float32")).model
    np.testing.assert_array_equal(stats(kerasbn.load_model(tmp_path / "out.keras")), stats(expected))
