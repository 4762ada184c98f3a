"""`kerasbn.load_model` bounds what a file declares by what it holds: a config's weight sizes and
the weights file's dataset shapes are refused before anything that large is built or read."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy.declared_sizes import weights_held
from kerasbn.errors import ModelLoadError

HUGE_UNITS = 10**9
DECLARED_VALUES = 900_000_000  # 3.6 GB of float32: under Keras's own 4 GiB guard


def _model() -> keras.Model:
    inputs = keras.Input((6,), name="features")
    x = keras.layers.Dense(4, name="dense")(inputs)
    return keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x))


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _zip(path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _empty_declared(f: h5py.Group, name: str) -> None:
    """Replace dataset ``name`` by one declaring DECLARED_VALUES floats that stores only its fill value."""
    del f[name]
    f.create_dataset(name, shape=(DECLARED_VALUES,), dtype="float32", chunks=(10**6,), compression="gzip")


def _huge_dense_keras(tmp_path):
    members = _members(_saved(tmp_path, "m.keras"))
    config = members["config.json"].decode().replace('"units": 4', f'"units": {HUGE_UNITS}')
    return _zip(tmp_path / "huge_dense.keras", {**members, "config.json": config.encode()})


def _huge_weights_keras(tmp_path):
    members = _members(_saved(tmp_path, "m.keras"))
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "r+") as f:
        _empty_declared(f, "layers/dense/vars/0")
    return _zip(tmp_path / "huge_weights.keras", {**members, "model.weights.h5": buffer.getvalue()})


def _huge_dense_h5(tmp_path):
    path = _saved(tmp_path, "m.h5")
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        (dense,) = [layer for layer in config["config"]["layers"] if layer["name"] == "dense"]
        dense["config"]["units"] = HUGE_UNITS
        f.attrs["model_config"] = json.dumps(config)
    return path


def _huge_weights_h5(tmp_path):
    path = _saved(tmp_path, "m.h5")
    with h5py.File(path, "r+") as f:
        _empty_declared(f, "model_weights/dense/dense/kernel")
    return path


def _huge_dense_folder(tmp_path):
    folder = tmp_path / "huge_dense"
    keras.saving.save_model(_model(), folder, zipped=False)
    config = (folder / "config.json").read_text().replace('"units": 4', f'"units": {HUGE_UNITS}')
    (folder / "config.json").write_text(config)
    return folder


def _huge_weights_folder(tmp_path):
    folder = tmp_path / "huge_weights"
    keras.saving.save_model(_model(), folder, zipped=False)
    with h5py.File(folder / "model.weights.h5", "r+") as f:
        _empty_declared(f, "layers/dense/vars/0")
    return folder


def _saved(tmp_path, name: str):
    path = tmp_path / name
    _model().save(path)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_huge_dense_keras, r"config declares more weights than the file holds \(layer 'dense' \(Dense\)"),
        (_huge_dense_h5, r"config declares more weights than the file holds \(layer 'dense' \(Dense\)"),
        (_huge_weights_keras, r"dataset 'layers/dense/vars/0' alone declares 3,600,000,000"),
        (_huge_weights_h5, r"dataset 'model_weights/dense/dense/kernel' alone declares 3,600,000,000"),
        (_huge_dense_folder, r"config declares more weights than the file holds \(layer 'dense' \(Dense\)"),
        (_huge_weights_folder, r"dataset 'layers/dense/vars/0' alone declares 3,600,000,000"),
    ],
    ids=["keras-config", "h5-config", "keras-weights", "h5-weights", "folder-config", "folder-weights"],
)
def test_a_file_that_declares_more_than_it_holds_is_refused(tmp_path, make, message):
    path = make(tmp_path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    before = [f.read_bytes() for f in files if f.is_file()]
    add_weight = keras.layers.Layer.add_weight

    with pytest.raises(ModelLoadError, match=message) as refused:
        kerasbn.load_model(path)

    assert str(refused.value).startswith(f"{path}: ") and "\n" not in str(refused.value)
    assert keras.layers.Layer.add_weight is add_weight  # Keras is left as it was
    assert [f.read_bytes() for f in files if f.is_file()] == before


@pytest.mark.parametrize("name", ["m.keras", "m.h5"])
def test_weights_held_counts_every_saved_value(tmp_path, name):
    model = _model()
    model.save(tmp_path / name)
    assert weights_held(tmp_path / name, name.rsplit(".", 1)[1]) == model.count_params()


def test_an_unzipped_folder_holds_the_values_of_its_weights_file(tmp_path):
    # More values than the 2²⁴ a config may add beyond what the file holds: counted from the weights file,
    # not from the folder's size, or the model would be refused.
    inputs = keras.Input((3,), dtype="int32")
    model = keras.Model(inputs, keras.layers.Embedding(20_000, 1_000)(inputs))
    keras.saving.save_model(model, tmp_path / "folder", zipped=False)
    assert weights_held(tmp_path / "folder", "keras") == model.count_params() == 20_000_000
    assert kerasbn.load_model(tmp_path / "folder").count_params() == model.count_params()


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_archives_stored_or_compressed_load_with_their_weights(tmp_path, compression):
    model = _model()
    model.get_layer("dense").kernel.assign(np.random.default_rng(0).normal(size=(6, 4)))
    model.save(tmp_path / "m.keras")
    path = _zip(tmp_path / "re.keras", _members(tmp_path / "m.keras"), compression)

    add_weight = keras.layers.Layer.add_weight

    loaded = kerasbn.load_model(path)

    assert keras.layers.Layer.add_weight is add_weight
    for ours, theirs in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
