"""`kerasbn.load_model`, `kerasbn.save_model` and `atomic_output`: safe loading,
one error type per failure, and atomic writes that never leave a partial file."""

from __future__ import annotations

import os
import stat

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy.files import atomic_output, load_inputs
from kerasbn.errors import KerasbnError, ModelLoadError, UnsupportedModelError, VerificationError


def _model() -> keras.Model:
    inputs = keras.Input((4,), name="features")
    return keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(3)(inputs)))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.keras"
    _model().save(path)
    return path


def test_load_round_trip_keras_and_h5(tmp_path):
    model = _model()
    x = np.ones((2, 4), "float32")
    for name in ("m.keras", "m.h5"):
        model.save(tmp_path / name)
        loaded = kerasbn.load_model(tmp_path / name)
        np.testing.assert_allclose(loaded(x), model(x))


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        (lambda p: p / "absent.keras", ModelLoadError, "no such file"),
        (lambda p: p, ModelLoadError, "is a directory without config.json"),
        (lambda p: (p / "x.keras").write_bytes(b"abc") and p / "x.keras", ModelLoadError, "not a .keras file"),
        (lambda p: (p / "x.h5").write_bytes(b"abc") and p / "x.h5", ModelLoadError, "not an HDF5 file"),
        (lambda p: (p / "x.onnx").write_bytes(b"abc") and p / "x.onnx", ModelLoadError, "unsupported file type"),
    ],
    ids=["missing", "directory", "not-zip", "not-hdf5", "suffix"],
)
def test_load_errors(tmp_path, setup, error, message):
    with pytest.raises(error, match=message):
        kerasbn.load_model(setup(tmp_path))


def test_an_unzipped_keras_folder_loads_like_the_archive(tmp_path):
    model = _model()
    keras.saving.save_model(model, tmp_path / "folder", zipped=False)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_array_equal(kerasbn.load_model(tmp_path / "folder")(x), model(x))


def test_an_unzipped_keras_folder_keeps_safe_mode(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t + 1.0)])
    keras.saving.save_model(model, tmp_path / "folder", zipped=False)
    with pytest.raises(ModelLoadError, match="safe mode"):
        kerasbn.load_model(tmp_path / "folder")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"saved_model.pb": b""}, "is a TensorFlow SavedModel folder, not a Keras model"),
        ({"config.json": b"{}"}, "folder without model weights"),
        ({"config.json": b"{", "model.weights.h5": b""}, "config.json is not valid JSON"),
        ({"config.json": b"[1]", "model.weights.h5": b""}, "config.json does not describe a model"),
    ],
    ids=["savedmodel", "no-weights", "bad-json", "not-a-model"],
)
def test_other_folders_are_refused_saying_what_they_are(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        kerasbn.load_model(tmp_path)


def test_lambda_needs_safe_mode_off(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t + 1.0)])
    model.save(tmp_path / "lam.keras")
    with pytest.raises(ModelLoadError, match="safe mode"):
        kerasbn.load_model(tmp_path / "lam.keras")
    assert kerasbn.load_model(tmp_path / "lam.keras", safe_mode=False) is not None


def test_unbuilt_sequential_is_unsupported(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras.Sequential([keras.layers.Dense(2)]).save(tmp_path / "s.keras")
    with pytest.raises(UnsupportedModelError, match="no input shape"):
        kerasbn.load_model(tmp_path / "s.keras")


def test_missing_custom_module(saved):
    with pytest.raises(ModelLoadError, match="cannot import module 'kbn_nope'"):
        kerasbn.load_model(saved, custom_modules=["kbn_nope"])


def test_save_refuses_existing_file_and_replaces_with_overwrite(tmp_path):
    path = tmp_path / "out.keras"
    path.write_bytes(b"old")
    with pytest.raises(KerasbnError, match="already exists"):
        kerasbn.save_model(_model(), path)
    assert path.read_bytes() == b"old"
    kerasbn.save_model(_model(), path, overwrite=True)
    assert kerasbn.load_model(path) is not None
    assert sorted(os.listdir(tmp_path)) == ["out.keras"]


def test_saved_file_has_normal_permissions(tmp_path):
    path = kerasbn.save_model(_model(), tmp_path / "out.keras")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_check_leaves_nothing(tmp_path):
    seen = []

    def check(reloaded):
        seen.append(reloaded)
        raise VerificationError("no")

    with pytest.raises(VerificationError):
        kerasbn.save_model(_model(), tmp_path / "out.keras", check=check)
    assert len(seen) == 1 and isinstance(seen[0], keras.Model)
    assert os.listdir(tmp_path) == []


def test_atomic_output_cleans_up_on_any_error(tmp_path):
    target = tmp_path / "f.onnx"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".onnx")
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path) == ["f.onnx"]


def test_atomic_output_does_not_clobber_a_file_that_appears_meanwhile(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(KerasbnError, match="already exists"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_bad_output_locations(tmp_path):
    with pytest.raises(KerasbnError, match="does not exist"):
        kerasbn.save_model(_model(), tmp_path / "no" / "m.keras")
    with pytest.raises(KerasbnError, match="must end in"):
        kerasbn.save_model(_model(), tmp_path / "m.txt")


def test_load_inputs_by_name_and_by_order(tmp_path, saved):
    model = kerasbn.load_model(saved)
    x = np.ones((5, 4), "float32")
    np.savez(tmp_path / "named.npz", features=x)
    np.savez(tmp_path / "ordered.npz", x)
    for name in ("named.npz", "ordered.npz"):
        np.testing.assert_array_equal(load_inputs(tmp_path / name, model), x)
    np.savez(tmp_path / "two.npz", x, x)
    with pytest.raises(KerasbnError, match="1 input"):
        load_inputs(tmp_path / "two.npz", model)


def test_weights_that_keras_skips_are_an_error(saved, monkeypatch):
    """Keras only warns when it leaves layers with fresh random weights; kerasbn refuses such a file."""
    import warnings

    real = keras.saving.load_model

    def skipping(*args, **kwargs):
        warnings.warn(
            "Skipping nested container at 'x': ... Affected layers will retain their freshly-initialized weights.",
            stacklevel=2,
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(keras.saving, "load_model", skipping)
    with pytest.raises(ModelLoadError, match="weights do not match"):
        kerasbn.load_model(saved)


def test_a_saved_model_that_does_not_load_back_is_not_written(tmp_path):
    """A Lambda model saved by a caller that loaded it with safe_mode=False, rechecked in safe mode."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t * 3.0)])
    with pytest.raises(KerasbnError, match=r"out.keras: the saved model does not load back \(contains a Lambda"):
        kerasbn.save_model(model, tmp_path / "out.keras", check=lambda reloaded: None)
    assert os.listdir(tmp_path) == []
