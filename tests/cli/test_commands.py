"""The commands on good input: output files, formats, exit codes, and the
guarantees around them (no overwrite without --force, nothing written after a
failed verification, one line per error)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.deploy.verify import VerifyResult
from tests.cli.conftest import KERASBN, assert_clean_error, digest, invoke, listing, run_script, tiny_model
from tests.helpers import assert_matches_original, randomize_bn


def _bn_layers(model) -> list[str]:
    return [layer.name for layer in model.layers if "BatchNormalization" in type(layer).__name__]


# audit


def test_audit_table(model_files):
    result = invoke("audit", model_files["keras"])
    assert result.exit_code == 0, result.stderr
    for name in ("bn_conv", "bn_dense", "conv", "dense", "Redundant biases"):
        assert name in result.stdout
    assert "Loading" not in result.output  # no progress when not on a terminal


def test_audit_json(model_files):
    result = invoke("audit", model_files["keras"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["totals"]["bn_layers"] == 2
    assert data["totals"]["foldable"] == 2
    assert [b["layer"] for b in data["redundant_biases"]] == ["dense"]


def test_audit_markdown(model_files):
    result = invoke("audit", model_files["keras"], "--format", "markdown")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("### BatchNormalization audit of `tiny`")
    assert "| BN | partner | direction | folds | reason |" in result.stdout
    assert "#### Redundant biases" in result.stdout


def test_audit_strict_exit_codes(model_files, tmp_path):
    assert invoke("audit", model_files["keras"], "--strict").exit_code == 1
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="relu")])
    plain.save(tmp_path / "plain.keras")
    result = invoke("audit", tmp_path / "plain.keras", "--strict")
    assert result.exit_code == 0, result.stderr


@pytest.fixture
def diverged(tmp_path) -> object:
    """A model file whose first BN's moving variance holds a NaN, as after a diverged training run."""
    model = tiny_model()
    variance = model.get_layer("bn_conv").moving_variance
    values = np.asarray(variance).copy()
    values[1] = np.nan
    variance.assign(values)
    model.save(tmp_path / "diverged.keras")
    return tmp_path / "diverged.keras"


def test_audit_lists_weights_that_cannot_be_right(diverged):
    result = invoke("audit", diverged, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["weight_problems"] == [
        {"layer": "bn_conv", "weight": "moving_variance", "problem": "1 NaN among its 3 values"}
    ]
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="relu")])
    plain.get_layer(index=0).kernel.assign(np.full((3, 2), np.inf))
    plain.save(diverged.with_name("inf.keras"))
    assert invoke("audit", diverged.with_name("inf.keras"), "--strict").exit_code == 1


@pytest.mark.parametrize("command", ["fold", "export"])
def test_fold_and_export_refuse_non_finite_weights_in_one_line(diverged, command):
    before = listing(diverged.parent)

    result = invoke(command, diverged)

    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "layer 'bn_conv': weight 'moving_variance' holds 1 NaN among its 3 values" in result.stderr
    assert listing(diverged.parent) == before


def test_audit_reads_legacy_h5(model_files):
    result = invoke("audit", model_files["h5"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["foldable"] == 2


# fold


def test_fold_writes_beside_the_input_and_verifies(model_files, copy_of):
    source = copy_of(model_files["keras"])
    fingerprint = digest(source)
    result = invoke("fold", source)
    assert result.exit_code == 0, result.stderr
    output = source.with_name("tiny.folded.keras")
    assert listing(source.parent) == {"tiny.keras", "tiny.folded.keras"}
    assert digest(source) == fingerprint
    assert "rewritten vs original" in result.stdout and "reloaded vs original" in result.stdout
    assert "2/2 BN layers folded" in result.stdout
    folded = kerasbn.load_model(output)
    assert _bn_layers(folded) == []
    x = np.random.default_rng(0).standard_normal((4, 6, 6, 2)).astype("float32")
    original = kerasbn.load_model(source)
    np.testing.assert_allclose(folded(x), original(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fold_of_a_mixed_precision_file(policy, tmp_path):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = tiny_model()
    finally:
        keras.config.set_dtype_policy(previous)
    source = tmp_path / "mixed.keras"
    model.save(source)
    result = invoke("fold", source, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    reloaded_check = data["verification"]["reloaded"]
    assert reloaded_check["passed"] is True and reloaded_check["reference"] == "float64"
    assert reloaded_check["dtype"] == policy.removeprefix("mixed_")
    folded = kerasbn.load_model(tmp_path / "mixed.folded.keras")
    assert _bn_layers(folded) == []
    assert {layer.dtype_policy.name for layer in folded.layers[1:]} == {policy}
    # Judged independently of the command's own report: against the original in float64.
    assert kerasbn.verify(kerasbn.load_model(source), folded, seed=5).passed


def test_fold_of_an_unzipped_keras_folder_writes_a_keras_file(tmp_path):
    model = tiny_model()
    keras.saving.save_model(model, tmp_path / "tiny", zipped=False)
    before = {p: digest(p) for p in (tmp_path / "tiny").rglob("*") if p.is_file()}
    result = invoke("fold", tmp_path / "tiny")
    assert result.exit_code == 0, result.stderr
    assert "2/2 BN layers folded" in result.stdout
    assert {p: digest(p) for p in (tmp_path / "tiny").rglob("*") if p.is_file()} == before
    x = np.random.default_rng(0).standard_normal((4, 6, 6, 2)).astype("float32")
    folded = kerasbn.load_model(tmp_path / "tiny.folded.keras")
    assert _bn_layers(folded) == []
    assert_matches_original(model, [np.asarray(folded(x), np.float64)], x, "float32")


@pytest.mark.parametrize("bn", [False, True], ids=["no-bn", "bn-that-stays"])
def test_fold_of_a_model_where_nothing_folds_says_so_and_checks_only_the_file(bn, tmp_path):
    inputs = keras.Input((5,), name="x")
    y = keras.layers.Dense(4, activation="relu")(keras.layers.Dense(3)(inputs))
    if bn:  # after an activation, at the output: it stays
        y = keras.layers.BatchNormalization()(y)
    model = keras.Model(inputs, y)
    model.save(tmp_path / "m.keras")
    result = invoke("fold", tmp_path / "m.keras", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["changed"] is False and data["fold"]["totals"]["folded"] == 0
    assert list(data["verification"]) == ["reloaded"] and data["verification"]["reloaded"]["passed"]
    table = invoke("fold", tmp_path / "m.keras", "-o", tmp_path / "t.keras")
    assert "Nothing folded: the model is unchanged" in table.stdout
    assert "reloaded vs original" in table.stdout and "rewritten vs original" not in table.stdout
    x = np.random.default_rng(0).standard_normal((4, 5)).astype("float32")
    np.testing.assert_array_equal(kerasbn.load_model(tmp_path / "m.folded.keras")(x), model(x))


def test_fold_of_a_time_distributed_video_model(tmp_path):
    frames = keras.Input((3, 7, 7, 2), name="frames")
    y = keras.layers.BatchNormalization(name="bn")(
        keras.layers.TimeDistributed(keras.layers.Conv2D(4, 3), name="td")(frames)
    )
    model = randomize_bn(keras.Model(frames, y))
    model.save(tmp_path / "video.keras")
    result = invoke("fold", tmp_path / "video.keras", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(f["layer"], f["partner"]) for f in data["fold"]["folded"]] == [("bn", "td")]
    x = np.random.default_rng(2).standard_normal((2, 3, 7, 7, 2)).astype("float32")
    folded = kerasbn.load_model(tmp_path / "video.folded.keras")
    assert _bn_layers(folded) == []
    assert_matches_original(model, [np.asarray(folded(x), np.float64)], x, "float32")


# Runs a command and prints its exit status, its peak resident memory (KiB) and its output: a fresh process,
# so the peak is that command's alone.
PEAK = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.stdout.write(done.stdout + done.stderr)\n"
)


@pytest.mark.large
def test_fold_of_a_4096_square_image_model_is_checked_within_the_memory_budget(tmp_path):
    """At the default batch 8 this check went past 6 GB; the batch now follows the model's activations."""
    from kerasbn.deploy.budget import DEFAULT_BUDGET

    image = keras.Input((4096, 4096, 3), name="image")
    y = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(8, 3, strides=2, name="conv")(image))
    y = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(y)))
    randomize_bn(keras.Model(image, y)).save(tmp_path / "big.keras")
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(KERASBN), "fold", str(tmp_path / "big.keras")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    (status, peak_kib), output = done.stdout.splitlines()[0].split(), done.stdout
    assert status == "0", output
    assert "Checked at batch 1 instead of 8: the model's activations take about 1.1 GiB a sample" in output
    assert "rewritten vs original" in output and "reloaded vs original" in output
    # The budget bounds the activations of one evaluation; the process adds TensorFlow and the model.
    assert int(peak_kib) * 1024 <= DEFAULT_BUDGET + 2 * 2**30, f"peak {int(peak_kib) / 2**20:.2f} GiB"


def test_fold_from_h5_writes_keras(model_files, copy_of):
    source = copy_of(model_files["h5"])
    result = invoke("fold", source, "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert (source.parent / "tiny.folded.keras").exists()


def test_fold_json(model_files, tmp_path):
    result = invoke("fold", model_files["keras"], "-o", tmp_path / "out.keras", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fold"]["totals"]["folded"] == 2
    assert data["verification"]["reloaded"]["passed"] is True
    assert data["output"] == str(tmp_path / "out.keras")


def test_existing_output_needs_force(model_files, tmp_path):
    output = tmp_path / "out.keras"
    output.write_bytes(b"precious")
    result = invoke("fold", model_files["keras"], "-o", output)
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert output.read_bytes() == b"precious"
    assert listing(tmp_path) == {"out.keras"}

    result = invoke("fold", model_files["keras"], "-o", output, "--force", "-q")
    assert result.exit_code == 0, result.stderr
    assert _bn_layers(kerasbn.load_model(output)) == []


def test_output_may_not_be_the_input_even_with_force(model_files, copy_of):
    source = copy_of(model_files["keras"])
    fingerprint = digest(source)
    result = invoke("fold", source, "-o", source, "--force")
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "is the input model" in result.stderr
    assert digest(source) == fingerprint


def test_bad_output_paths(model_files, tmp_path):
    for output, message in [
        (tmp_path / "missing_folder" / "out.keras", "does not exist"),
        (tmp_path, "is a directory"),
        (tmp_path / "out.txt", "must end in .keras or .h5"),
    ]:
        result = invoke("fold", model_files["keras"], "-o", output)
        assert_clean_error(result.exit_code, result.stdout, result.stderr)
        assert message in result.stderr
    assert listing(tmp_path) == set()


def _failing(passes_before_failure: int):
    calls = []
    real = kerasbn.verify

    def verify(reference, candidate, inputs=None, **kwargs):
        calls.append(candidate)
        result = real(reference, candidate, inputs, **kwargs)
        if len(calls) > passes_before_failure:
            return VerifyResult(**{**result.to_dict(), "passed": False, "max_abs_error": 0.5})
        return result

    return verify


@pytest.mark.parametrize("stage", [0, 1], ids=["in-memory", "reloaded"])
@pytest.mark.parametrize("command", ["fold", "strip-biases"])
def test_failed_verification_exits_1_and_writes_nothing(model_files, copy_of, monkeypatch, command, stage):
    source = copy_of(model_files["keras"])
    monkeypatch.setattr(kerasbn, "verify", _failing(stage))
    result = invoke(command, source)
    assert result.exit_code == 1
    assert "differs from the original" in result.stderr and "nothing written" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert listing(source.parent) == {"tiny.keras"}


def test_no_verify_skips_the_check(model_files, tmp_path, monkeypatch):
    monkeypatch.setattr(kerasbn, "verify", _failing(0))
    result = invoke("fold", model_files["keras"], "-o", tmp_path / "out.keras", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert "Not verified" in result.stdout


def test_inputs_file(model_files, tmp_path):
    good = tmp_path / "x.npz"
    np.savez(good, image=np.random.default_rng(1).standard_normal((3, 6, 6, 2)).astype("float32"))
    result = invoke("fold", model_files["keras"], "-o", tmp_path / "out.keras", "--inputs", good, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verification"]["rewritten"]["batch_size"] == 3

    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((3, 5, 5, 2), "float32"))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, image=np.array([object()], dtype=object))
    for path, message in [
        (bad, "the model expects"),
        (pickled, "not a readable .npz"),
        (tmp_path / "no.npz", "no such"),
    ]:
        result = invoke("fold", model_files["keras"], "-o", tmp_path / "other.keras", "--inputs", path)
        assert_clean_error(result.exit_code, result.stdout, result.stderr)
        assert message in result.stderr
    assert not (tmp_path / "other.keras").exists()


# strip-biases


def test_strip_biases(model_files, copy_of):
    source = copy_of(model_files["keras"])
    result = invoke("strip-biases", source)
    assert result.exit_code == 0, result.stderr
    assert "1 biases removed" in result.stdout
    stripped = kerasbn.load_model(source.with_name("tiny.nobias.keras"))
    assert stripped.get_layer("dense").use_bias is False
    assert len(_bn_layers(stripped)) == 2


# --import, custom layers, subclassed models


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `kbn_user_layers` on sys.path that registers a layer and a subclassed model."""
    (tmp_path / "kbn_user_layers.py").write_text(
        textwrap.dedent(
            """
            import keras

            @keras.saving.register_keras_serializable(package="kbn_user")
            class Scale(keras.layers.Layer):
                def call(self, x):
                    return 2.0 * x

            @keras.saving.register_keras_serializable(package="kbn_user")
            class Net(keras.Model):
                def __init__(self, **kwargs):
                    super().__init__(**kwargs)
                    self.dense = keras.layers.Dense(2)
                    self.bn = keras.layers.BatchNormalization()

                def call(self, x):
                    return self.bn(self.dense(x))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import kbn_user_layers

    custom = keras.Sequential([keras.Input((3,)), kbn_user_layers.Scale(), keras.layers.Dense(2), keras.layers.ReLU()])
    custom.save(tmp_path / "custom.keras")
    net = kbn_user_layers.Net()
    net(np.zeros((1, 3), "float32"))
    net.save(tmp_path / "subclassed.keras")
    # Forget the registration, as a fresh process would not have it.
    registry = keras.saving.get_custom_objects()
    for name in ("kbn_user>Scale", "kbn_user>Net"):
        registry.pop(name, None)
    sys.modules.pop("kbn_user_layers")
    yield tmp_path
    sys.modules.pop("kbn_user_layers", None)
    for name in ("kbn_user>Scale", "kbn_user>Net"):
        registry.pop(name, None)


def test_unknown_custom_layer_suggests_import(user_module):
    result = invoke("audit", user_module / "custom.keras")
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "'kbn_user>Scale'" in result.stderr or "'Scale'" in result.stderr
    assert "--import" in result.stderr

    result = invoke("audit", user_module / "custom.keras", "--import", "kbn_user_layers", "--format", "json")
    assert result.exit_code == 0, result.stderr


def test_subclassed_model_folds_in_place(user_module):
    result = invoke("fold", user_module / "subclassed.keras", "--import", "kbn_user_layers", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fold"]["totals"]["folded"] == 1 and data["fold"]["method"] == "in_place"
    assert data["verification"]["reloaded"]["passed"]
    assert (user_module / "subclassed.folded.keras").exists()


def test_import_of_a_missing_module(model_files):
    result = invoke("audit", model_files["keras"], "--import", "no_such_module_kbn")
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "cannot import module 'no_such_module_kbn'" in result.stderr


# unexpected errors


def test_unexpected_error_is_one_line_and_traceback_only_with_verbose(model_files, monkeypatch):
    def boom(model):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(kerasbn, "audit", boom)
    result = invoke("audit", model_files["keras"])
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert "unexpected RuntimeError: boom" in result.stderr and "-v" in result.stderr

    result = invoke("audit", model_files["keras"], "-v")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kerasbn: error: unexpected RuntimeError: boom")


def test_usage_errors_exit_2(model_files):
    assert invoke("audit").exit_code == 2
    assert invoke("audit", model_files["keras"], "--format", "yaml").exit_code == 2
    assert invoke("fold", model_files["keras"], "--batch", "0").exit_code == 2


# the installed script, end to end


@pytest.mark.slow
def test_installed_script_folds_and_audits(model_files, copy_of):
    source = copy_of(model_files["keras"])
    done = run_script("fold", source)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # TensorFlow's start-up noise is held back
    assert "2/2 BN layers folded" in done.stdout
    done = run_script("audit", source.with_name("tiny.folded.keras"), "--strict", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"]["bn_layers"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        # The installed script audits --strict in a process of its own above: test-large.
        pytest.param(["audit", "{model}", "--strict", "--format", "json"], marks=pytest.mark.large),
        ["fold", "{model}", "--batch", "0"],
    ],
    ids=["version", "audit-strict-findings", "bad-usage"],
)
def test_python_dash_m_runs_the_same_command(args, model_files):
    # A fresh interpreter, as a user without the console script on the PATH runs it: same output, same exit code.
    args = [a.format(model=model_files["keras"]) for a in args]
    expected = invoke(*args)
    done = subprocess.run(
        [sys.executable, "-m", "kerasbn_cli", *args], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert done.returncode == expected.exit_code, done.stderr
    assert expected.exit_code in (0, 1, 2)
    if expected.exit_code == 2:
        assert "--batch" in done.stderr and "Traceback" not in done.stderr
    else:
        assert done.stdout == expected.stdout


# audit --quantization


@pytest.mark.parametrize("fmt", ["table", "json", "markdown"])
def test_audit_quantization_lists_each_folded_kernel(fmt, model_files):
    result = invoke("audit", model_files["keras"], "--quantization", "--format", fmt)
    assert result.exit_code == 0, result.stderr
    expected = kerasbn.audit_quantization(kerasbn.load_model(model_files["keras"]))
    assert [w.layer for w in expected.layers] == ["conv", "dense"]
    if fmt == "json":
        assert json.loads(result.stdout)["quantization"] == json.loads(json.dumps(expected.to_dict()))
    else:
        assert "Weight ranges after the fold" in result.stdout
        for w in expected.layers:
            assert f"{w.ratio_after:.1f}×" in result.stdout
    plain = invoke("audit", model_files["keras"], "--format", fmt)
    assert "Weight ranges" not in plain.stdout and "quantization" not in plain.stdout
