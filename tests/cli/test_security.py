"""A model file must not be able to run code unless the user says --unsafe."""

from __future__ import annotations

import keras
import pytest

from tests.cli.conftest import assert_clean_error, invoke, listing, run_script


def _booby_trapped(folder, suffix: str):
    """A model whose Lambda creates `marker` whenever the model is rebuilt from its file."""
    marker = folder / "pwned.txt"
    # A real Python lambda (Keras marshals its bytecode); the path is a constant in the code.
    payload = eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t)[1]")  # noqa: S307
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Lambda(payload), keras.layers.Dense(2), keras.layers.ReLU()]
    )
    path = folder / f"evil{suffix}"
    model.save(path)
    marker.unlink()  # building the model above ran the payload once
    return path, marker


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("command", ["audit", "fold", "strip-biases", "export"])
def test_lambda_payload_is_refused_and_never_runs(tmp_path, suffix, command):
    path, marker = _booby_trapped(tmp_path, suffix)
    before = listing(tmp_path)

    result = invoke(command, path)

    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "--unsafe" in result.stderr and "trust" in result.stderr
    assert not marker.exists()
    assert listing(tmp_path) == before


def test_the_payload_is_real_with_unsafe(tmp_path):
    """The same file with --unsafe does run the code: the refusal above is what protects."""
    path, marker = _booby_trapped(tmp_path, ".keras")
    result = invoke("audit", path, "--unsafe", "-q")
    assert result.exit_code == 0, result.stderr
    assert marker.exists()


@pytest.mark.slow
def test_lambda_payload_refused_by_the_installed_script(tmp_path):
    path, marker = _booby_trapped(tmp_path, ".keras")
    done = run_script("fold", path)
    assert_clean_error(done.returncode, done.stdout, done.stderr)
    assert not marker.exists()
    assert not (tmp_path / "evil.folded.keras").exists()
