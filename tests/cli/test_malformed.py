"""Every broken or refused input, through every command: exit 2, one line that
says what is wrong, no traceback, nothing written, the input unchanged."""

from __future__ import annotations

import pytest

from tests.cli.conftest import COMMANDS, assert_clean_error, digest, invoke, listing, run_script

# What the one line must say for each case of the corpus.
EXPECTED = {
    "missing": "no such file",
    "empty_keras": "not a .keras file",
    "text_keras": "not a .keras file",
    "random_bytes": "not a .keras file",
    "truncated_half": "truncated or corrupted",
    "truncated_tail": "truncated or corrupted",
    "flipped_weights": "corrupted",
    "no_config": "without config.json",
    "no_weights": "without model weights",
    "garbage_weights": "corrupted",
    "config_not_json": "not valid JSON",
    "config_a_list": "does not describe a model",
    "config_no_class": "does not describe a model",
    "unknown_layer": "'MyFancyReLU'; import the module",
    "os_system_injection": "'system'",
    "wrong_weight_shapes": "cannot rebuild the model",
    "empty_h5": "not an HDF5 file",
    "text_h5": "not an HDF5 file",
    "truncated_h5": "truncated or corrupted HDF5",
    "zip_named_h5": "rename it to .keras",
    "h5_named_keras": "rename it to .h5",
    "weights_only_h5": "without a model config",
    "unsupported_suffix": "unsupported file type",
    "lambda_keras": "--unsafe",
    "lambda_h5": "--unsafe",
    "unbuilt_sequential": "no input shape",
    "a_directory": "is a TensorFlow SavedModel folder",
    "zip_bomb": "decompression bomb",
}


def test_corpus_is_complete(corpus):
    assert set(corpus) == set(EXPECTED)
    assert len(corpus) >= 20


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_malformed_input_fails_cleanly(corpus, case, command):
    path = corpus[case]
    folder = path.parent
    before = listing(folder)
    fingerprint = digest(path) if path.is_file() else None

    result = invoke(command, path)

    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert EXPECTED[case] in result.stderr, result.stderr
    assert str(path) in result.stderr  # the line names the file
    assert listing(folder) == before  # no output, no temporary left behind
    if fingerprint is not None:
        assert digest(path) == fingerprint


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "command"), [("truncated_half", "fold"), ("lambda_keras", "export"), ("unknown_layer", "audit")]
)
def test_malformed_input_in_a_real_process(corpus, case, command):
    path = corpus[case]
    before = listing(path.parent)

    done = run_script(command, path)

    assert_clean_error(done.returncode, done.stdout, done.stderr)
    assert EXPECTED[case] in done.stderr
    assert listing(path.parent) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_verbose_does_not_add_tracebacks_to_input_errors(corpus, command):
    result = invoke(command, corpus["truncated_half"], "-v")
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
