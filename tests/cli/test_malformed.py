"""Every broken or refused input, through every command: exit 2, one line that
says what is wrong, no traceback, nothing written, the input unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from tests.cli.conftest import COMMANDS, KERASBN, assert_clean_error, digest, invoke, listing, run_script

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
    "declares_huge_dense": "the model config declares more weights than the file holds (layer 'dense' (Dense)",
    "declares_huge_weights": "dataset 'layers/dense/vars/0' alone declares 3,600,000,000",
    "input_int32": "layer 'conv' (Conv2D) reads a tensor of dtype int32",
    "input_bool": "layer 'conv' (Conv2D) reads a tensor of dtype bool",
    "input_string": "layer 'conv' (Conv2D) reads a tensor of dtype string",
    "bn_int4_policy": "layer 'bn_conv' (BatchNormalization) has the quantized dtype policy 'int4_from_float32'",
    "bn_bool_dtype": "layer 'bn_conv' (BatchNormalization) has the dtype policy 'bool'",
    "input_listed_twice": "lists the input 'image' more than once",
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


# The script runs as the child of a small interpreter: a forked process's peak resident size starts at its
# parent's (Linux carries the parent's high-water mark through fork and exec), and the suite's own process
# grows past 2 GiB in some orders. The launcher reaps it with wait4 and writes its peak to a file.
_LAUNCHER = """
import os, resource, sys
memory, peak_file, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    os.execv(command[0], command)
_, status, usage = os.wait4(pid, 0)
with open(peak_file, "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_limited(*args: object, memory: int, timeout: int = 300) -> tuple[int, str, str, int]:
    """The installed script under an address-space limit: exit code, stdout, stderr and its peak resident bytes."""
    with tempfile.TemporaryDirectory() as folder:
        peak_file = os.path.join(folder, "peak")
        done = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(memory), peak_file, str(KERASBN), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        with open(peak_file) as f:
            peak = int(f.read())
    return done.returncode, done.stdout, done.stderr, peak


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", ["audit", pytest.param("fold", marks=pytest.mark.large), pytest.param("export", marks=pytest.mark.large)]
)
@pytest.mark.parametrize("case", ["declares_huge_dense", "declares_huge_weights"])
def test_a_file_that_declares_more_than_it_holds_is_refused_in_bounded_memory(corpus, case, command):
    # The 32 KB files declare 192 GB (a Dense kernel) and 3.6 GB (a weights dataset); the command
    # without them peaks near 1 GB resident.
    path = corpus[case]
    before = listing(path.parent)

    code, stdout, stderr, peak = _run_limited(command, path, memory=3 * 2**30)

    assert_clean_error(code, stdout, stderr)
    assert EXPECTED[case] in stderr
    assert peak < 2 * 2**30, peak
    assert listing(path.parent) == before
