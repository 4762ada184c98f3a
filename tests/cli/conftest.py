"""Fixtures for the command-line tests: tiny model files and a corpus of broken ones.

Models are a few hundred parameters so a whole command runs in well under a
second once TensorFlow is loaded; the corpus is built once per session.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from kerasbn_cli.main import main
from tests.helpers import randomize_bn

KERASBN = Path(sys.executable).with_name("kerasbn")
COMMANDS = ("audit", "fold", "strip-biases", "export", "calibrate", "swap", "qat")


def tiny_model() -> keras.Model:
    """Conv2D → BN → ReLU → Flatten → Dense(bias) → BN: one conv fold, one dense fold with a redundant bias."""
    inputs = keras.Input((6, 6, 2), name="image")
    x = keras.layers.Conv2D(3, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn_conv")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(4, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn_dense")(x)
    return randomize_bn(keras.Model(inputs, x, name="tiny"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def invoke(*args: str) -> object:
    """Run the CLI in this process (TensorFlow already loaded) and return click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run_script(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `kerasbn` console script in a fresh process."""
    return subprocess.run(
        [str(KERASBN), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_clean_error(code: int, stdout: str, stderr: str, *, exit_code: int = 2) -> None:
    """Exit code 2, exactly one line on stderr, nothing on stdout, no traceback."""
    lines = stderr.strip().splitlines()
    assert code == exit_code, (code, stdout, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("kerasbn: error: "), stderr
    assert "Traceback" not in stderr + stdout
    assert stdout == ""


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """A good .keras and .h5 of `tiny_model`, in a read-only-by-convention folder."""
    folder = tmp_path_factory.mktemp("models")
    model = tiny_model()
    paths = {"keras": folder / "tiny.keras", "h5": folder / "tiny.h5"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    return paths


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def declared_weights(weights: bytes) -> bytes:
    """``weights`` with the Dense kernel declared as 900,000,000 float32 values that hold no data.

    Chunked and compressed, the dataset stores next to nothing: 3.6 GB declared,
    under the 4 GiB from which Keras's own guard refuses such datasets.
    """
    import h5py

    buffer = io.BytesIO(weights)
    with h5py.File(buffer, "r+") as f:
        del f["layers/dense/vars/0"]
        f.create_dataset(
            "layers/dense/vars/0", shape=(900_000_000,), dtype="float32", chunks=(10**6,), compression="gzip"
        )
    return buffer.getvalue()


def with_layer(config: dict, name: str, **settings: object) -> dict:
    """A copy of a functional model's config with settings of the layer ``name`` replaced."""
    config = copy.deepcopy(config)
    (layer,) = [layer for layer in config["config"]["layers"] if layer["name"] == name]
    layer["config"].update(settings)
    return config


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, model_files) -> dict[str, Path]:
    """At least 20 broken or refused model files, each named after what is wrong with it."""
    folder = tmp_path_factory.mktemp("corpus")
    good = model_files["keras"].read_bytes()
    good_h5 = model_files["h5"].read_bytes()
    with zipfile.ZipFile(model_files["keras"]) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])

    def write(name: str, data: bytes) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    def with_config(name: str, text: str) -> Path:
        return _zip(folder / name, {**members, "config.json": text.encode()})

    cases = {
        "missing": folder / "missing.keras",
        "empty_keras": write("empty.keras", b""),
        "text_keras": write("text.keras", b"this is not a model\n"),
        "random_bytes": write("random.keras", np.random.default_rng(0).bytes(4096)),
        "truncated_half": write("truncated_half.keras", good[: len(good) // 2]),
        "truncated_tail": write("truncated_tail.keras", good[:-7]),
        "flipped_weights": write("flipped.keras", good[:2000] + bytes([good[2000] ^ 0xFF]) + good[2001:]),
        "no_config": _zip(folder / "no_config.keras", {k: v for k, v in members.items() if k != "config.json"}),
        "no_weights": _zip(folder / "no_weights.keras", {k: v for k, v in members.items() if k != "model.weights.h5"}),
        "garbage_weights": _zip(folder / "garbage_weights.keras", {**members, "model.weights.h5": b"\0" * 64}),
        "config_not_json": with_config("config_not_json.keras", "{not json"),
        "config_a_list": with_config("config_a_list.keras", "[1, 2, 3]"),
        "config_no_class": with_config("config_no_class.keras", '{"config": {}}'),
        "unknown_layer": with_config(
            "unknown_layer.keras",
            json.dumps(config).replace(
                '"module": "keras.layers", "class_name": "ReLU"', '"module": null, "class_name": "MyFancyReLU"'
            ),
        ),
        "os_system_injection": with_config(
            "os_system.keras",
            json.dumps(config).replace(
                '"module": "keras.layers", "class_name": "ReLU"', '"module": "os", "class_name": "system"'
            ),
        ),
        "wrong_weight_shapes": with_config(
            "wrong_shapes.keras", json.dumps(config).replace('"units": 4', '"units": 5')
        ),
        "empty_h5": write("empty.h5", b""),
        "text_h5": write("text.h5", b"not hdf5 at all"),
        "truncated_h5": write("truncated.h5", good_h5[:3000]),
        "zip_named_h5": write("zip_named.h5", good),
        "h5_named_keras": write("h5_named.keras", good_h5),
        "weights_only_h5": folder / "weights_only.h5",
        "unsupported_suffix": write("model.pb", good),
        "lambda_keras": folder / "lambda.keras",
        "lambda_h5": folder / "lambda.h5",
        "unbuilt_sequential": folder / "unbuilt.keras",
        "a_directory": folder / "saved_model_dir",
        "zip_bomb": folder / "bomb.keras",
        "declares_huge_dense": with_config(
            "huge_dense.keras", json.dumps(config).replace('"units": 4', f'"units": {10**9}')
        ),
        "declares_huge_weights": _zip(
            folder / "huge_weights.keras",
            {**members, "model.weights.h5": declared_weights(members["model.weights.h5"])},
        ),
        "input_int32": with_config("input_int32.keras", json.dumps(with_layer(config, "image", dtype="int32"))),
        "input_bool": with_config("input_bool.keras", json.dumps(with_layer(config, "image", dtype="bool"))),
        "input_string": with_config("input_string.keras", json.dumps(with_layer(config, "image", dtype="string"))),
        "bn_int4_policy": with_config(
            "bn_int4.keras", json.dumps(with_layer(config, "bn_conv", dtype="int4_from_float32"))
        ),
        "bn_bool_dtype": with_config("bn_bool.keras", json.dumps(with_layer(config, "bn_conv", dtype="bool"))),
        "input_listed_twice": with_config(
            "input_twice.keras",
            json.dumps(
                {**config, "config": {**config["config"], "input_layers": [config["config"]["input_layers"]] * 2}}
            ),
        ),
    }
    with zipfile.ZipFile(cases["zip_bomb"], "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        with archive.open("padding.bin", "w") as member:
            for _ in range(80):
                member.write(bytes(2**20))
    assert "ReLU" in members["config.json"].decode() and '"units": 4' in members["config.json"].decode()
    import h5py

    with h5py.File(cases["weights_only_h5"], "w") as f:
        f["weights"] = np.zeros(3)
    lam = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t * 2.0)])
    lam.save(cases["lambda_keras"])
    lam.save(cases["lambda_h5"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saving a model that has not yet been built": the point of the case
        keras.Sequential([keras.layers.Dense(2)]).save(cases["unbuilt_sequential"])
    cases["a_directory"].mkdir()
    (cases["a_directory"] / "saved_model.pb").write_bytes(b"")
    assert len(cases) >= 20
    return cases


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty folder to run a command in."""
    return tmp_path


@pytest.fixture
def copy_of(tmp_path):
    """Copy a file into this test's folder so the test may write beside it."""

    def copy(path: Path, name: str | None = None) -> Path:
        target = tmp_path / (name or path.name)
        shutil.copy2(path, target)
        return target

    return copy
