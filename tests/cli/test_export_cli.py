"""`kerasbn export`: the op table, the ONNX Runtime and LiteRT checks, int8, exit codes and files."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import keras
import numpy as np
import onnx
import pytest

import kerasbn
import kerasbn.deploy.export as pipeline
from kerasbn.deploy.verify import Reference
from tests.cli.conftest import assert_clean_error, invoke, listing, run_script


def test_export_prints_the_op_table_and_writes_beside_the_input(model_files, copy_of):
    source = copy_of(model_files["keras"])
    result = invoke("export", source, "--compare-unfolded")
    assert result.exit_code == 0, result.stderr
    output = source.with_name("tiny.onnx")
    assert listing(source.parent) == {"tiny.keras", "tiny.onnx"}
    for text in ("Before fold", "After fold", "Total", "Model size", "batch 1", "batch 8", f"Wrote {output}"):
        assert text in result.stdout
    ops = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert "BatchNormalization" not in ops


def test_export_says_what_the_fold_did_in_one_conversion(model_files, tmp_path):
    result = invoke("export", model_files["keras"], "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.stderr
    assert "Before fold" not in result.stdout and "Count" in result.stdout
    assert "Folded 2 of 2 BatchNormalization layer(s) first (--compare-unfolded" in result.stdout


def test_export_without_fold_and_verify(model_files, tmp_path):
    result = invoke(
        "export", model_files["keras"], "-o", tmp_path / "m.onnx", "--no-fold", "--no-verify", "--opset", "13"
    )
    assert result.exit_code == 0, result.stderr
    assert "Before fold" not in result.stdout and "Not verified" in result.stdout
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 13


def test_export_failed_check_exits_1_and_writes_nothing(model_files, tmp_path, monkeypatch):
    real = Reference.judge

    def pessimist(*args):
        return tuple(dataclasses.replace(c, passed=False, max_abs_error=1.0) for c in real(*args))

    monkeypatch.setattr(Reference, "judge", pessimist)
    result = invoke("export", model_files["keras"], "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "ONNX Runtime disagrees with Keras" in result.stderr
    assert listing(tmp_path) == set()


def test_export_checks_at_the_given_batch_and_tolerances(model_files, tmp_path, monkeypatch):
    seen = {}
    real = pipeline.export

    def spy(*args, **kwargs):
        seen.update(vars(kwargs["checks"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "export", spy)
    args = ("-o", tmp_path / "m.onnx", "--batch", "3", "--atol", "1e-3", "--rtol", "1e-2")
    result = invoke("export", model_files["keras"], *args)
    assert result.exit_code == 0, result.stderr
    assert (list(seen["batch_sizes"]), seen["atol"], seen["rtol"]) == ([1, 3], 1e-3, 1e-2)
    assert "batch 3" in result.stdout and "batch 8" not in result.stdout


def test_export_json_and_batch_one_checks_batch_one_only(model_files, tmp_path):
    result = invoke(
        "export",
        model_files["keras"],
        "-o",
        tmp_path / "m.onnx",
        "--batch",
        "1",
        "--format",
        "json",
        "--compare-unfolded",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [c["batch_size"] for c in data["checks"]] == [1]
    assert data["verified"] and data["fold"]["totals"]["folded"] == 2
    assert sum(data["op_counts"].values()) < sum(data["op_counts_unfolded"].values())


def test_export_refuses_existing_output(model_files, tmp_path):
    output = tmp_path / "m.onnx"
    output.write_bytes(b"keep")
    result = invoke("export", model_files["keras"], "-o", output)
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert output.read_bytes() == b"keep"
    assert invoke("export", model_files["keras"], "-o", output, "--force", "-q").exit_code == 0
    assert output.read_bytes() != b"keep"


@pytest.mark.slow
def test_installed_script_exports(model_files, tmp_path):
    done = run_script("export", model_files["keras"], "-o", tmp_path / "m.onnx")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "Folded 2 of 2" in done.stdout and "ONNX Runtime vs Keras" in done.stdout


@pytest.mark.slow
def test_export_on_another_backend_is_one_clear_line(model_files, tmp_path):
    done = run_script("export", model_files["keras"], "-o", tmp_path / "m.onnx", env={"KERAS_BACKEND": "jax"})
    assert_clean_error(done.returncode, done.stdout, done.stderr)
    assert "KERAS_BACKEND=tensorflow" in done.stderr
    assert listing(tmp_path) == set()


def test_export_grouped_convolution_and_exact_gelu(tmp_path):
    """The two things tf2onnx could not convert before: keras-hub's grouped convs and exact GELU."""
    import json

    import keras

    from tests.helpers import randomize_bn

    inputs = keras.Input((6, 6, 4), name="image")
    x = keras.layers.Conv2D(4, 3, groups=4, use_bias=False)(inputs)  # keras-hub's depthwise convolution
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation(keras.activations.gelu)(x)
    source = tmp_path / "hub_like.keras"
    randomize_bn(keras.Model(inputs, x)).save(source)

    result = invoke("export", source, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.stderr
    assert "batch 8" in result.stdout and "FAILED" not in result.stdout
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"Conv", "Erf"} <= ops and not ops & {"StatefulPartitionedCall", "BatchNormalization", "Erfc"}
    [conv] = [node for node in graph.node if node.op_type == "Conv"]
    assert onnx.helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 4

    result = invoke("export", source, "-o", tmp_path / "j.onnx", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified"] and isinstance(report["passes"], list)


# LiteRT and int8 (--to, the suffix, --int8 --calibration --min-agreement)

SUFFIXES = {"onnx": ".onnx", "litert": ".tflite"}
RUNTIMES = {"onnx": "ONNX Runtime vs Keras", "litert": "LiteRT vs Keras"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Calibration and test rows for `tiny_model` (named after its input), and a file of the wrong shape."""
    folder = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(0)
    np.savez(folder / "calibration.npz", image=rng.standard_normal((64, 6, 6, 2)).astype("float32"))
    np.savez(folder / "test.npz", image=rng.standard_normal((16, 6, 6, 2)).astype("float32"))
    np.savez(folder / "wrong.npz", image=rng.standard_normal((64, 5, 5, 2)).astype("float32"))
    return folder


@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_export_picks_the_format_from_the_suffix(fmt, model_files, tmp_path):
    output = tmp_path / f"m{SUFFIXES[fmt]}"
    result = invoke("export", model_files["keras"], "-o", output, "--compare-unfolded")
    assert result.exit_code == 0, result.stderr
    for text in ("Before fold", "After fold", f"{RUNTIMES[fmt]}, batch 1", f"{RUNTIMES[fmt]}, batch 8"):
        assert text in result.stdout
    assert listing(tmp_path) == {output.name}


def test_export_to_litert_writes_beside_the_input(model_files, copy_of):
    source = copy_of(model_files["keras"])
    result = invoke("export", source, "--to", "litert", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "litert" and data["verified"] and "MUL" not in data["op_counts"]
    assert listing(source.parent) == {"tiny.keras", "tiny.tflite"}


@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_int8_export_reports_and_writes(fmt, model_files, rows, tmp_path):
    output = tmp_path / f"m.int8{SUFFIXES[fmt]}"
    calibration, test = rows / "calibration.npz", rows / "test.npz"
    # The tiny model is no classifier: the agreement of its arg-max is not the point here.
    args = ("--int8", "--calibration", calibration, "--inputs", test, "--min-agreement", "0")
    result = invoke("export", model_files["keras"], "-o", output, *args)
    assert result.exit_code == 0, result.stderr
    for text in (
        "Folded 2 of 2",
        RUNTIMES[fmt],
        "top-1 agreement",
        "calibration",
        "test.npz",
        "Latency",
        f"Wrote {output}",
    ):
        assert text in result.stdout
    assert listing(tmp_path) == {output.name}
    result = invoke("export", model_files["keras"], "-o", output, *args, "--force", "--format", "json")
    data = json.loads(result.stdout)
    assert [(a["dataset"], a["samples"]) for a in data["agreements"]] == [("calibration", 64), ("test.npz", 16)]
    assert data["size_int8"] == output.stat().st_size and data["format"] == fmt


@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_int8_below_min_agreement_exits_1_and_writes_nothing(fmt, model_files, rows, tmp_path, monkeypatch):
    import kerasbn.deploy.quantize as quantize

    real = quantize._agreement
    monkeypatch.setattr(quantize, "_agreement", lambda *a: dataclasses.replace(real(*a), top1=0.5))
    calibration = rows / "calibration.npz"
    result = invoke(
        "export", model_files["keras"], "-o", tmp_path / f"m{SUFFIXES[fmt]}", "--int8", "--calibration", calibration
    )
    assert_clean_error(result.exit_code, result.stdout, result.stderr, exit_code=1)
    assert "below the required 99.00 %" in result.stderr
    assert listing(tmp_path) == set()


BAD_EXPORTS = {
    "int8_without_calibration": (("--int8",), "--int8 needs --calibration"),
    "calibration_without_int8": (("--calibration", "{rows}/calibration.npz"), "--calibration goes with --int8"),
    "missing_calibration": (("--int8", "--calibration", "{rows}/nope.npz"), "no such inputs file"),
    "mismatched_calibration": (("--int8", "--calibration", "{rows}/wrong.npz"), "the model expects"),
    "unknown_suffix": (("-o", "{out}/m.pb"), "cannot tell the format"),
    "suffix_against_to": (("-o", "{out}/m.onnx", "--to", "litert"), "not litert"),
    "unknown_format": (("-o", "{out}/m.onnx", "--to", "openvino"), "unknown export format 'openvino'"),
    "opset_for_litert": (("-o", "{out}/m.tflite", "--opset", "13"), "opset applies to ONNX only, not LiteRT"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXPORTS))
@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_bad_export_input_is_one_line_exit_2_nothing_written(case, fmt, model_files, rows, tmp_path):
    args, message = BAD_EXPORTS[case]
    args = [a.format(rows=rows, out=tmp_path) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / f"m{SUFFIXES[fmt]}")]
    result = invoke("export", model_files["keras"], *args)
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert message in result.stderr
    assert listing(tmp_path) == set()


@pytest.fixture
def layer_module(tmp_path, monkeypatch):
    """A module `kbn_litert_layers` registering a layer LiteRT runs and one it has no builtin op for."""
    (tmp_path / "kbn_litert_layers.py").write_text(
        textwrap.dedent(
            """
            import keras

            @keras.saving.register_keras_serializable(package="kbn_litert")
            class Twice(keras.layers.Layer):
                def call(self, x):
                    return 2.0 * x

            @keras.saving.register_keras_serializable(package="kbn_litert")
            class Inverse(keras.layers.Layer):
                def call(self, x):
                    return keras.ops.reshape(keras.ops.inv(keras.ops.reshape(x, (-1, 2, 2))), (-1, 4))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import kbn_litert_layers

    for name in ("Twice", "Inverse"):
        inputs = keras.Input((4,))
        x = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))
        keras.Model(inputs, getattr(kbn_litert_layers, name)()(x)).save(tmp_path / f"{name}.keras")
    yield tmp_path
    sys.modules.pop("kbn_litert_layers", None)


@pytest.mark.parametrize(("layer", "code"), [("Twice", 0), ("Inverse", 2)])
def test_custom_layers_through_import(layer, code, layer_module):
    output = layer_module / "m.tflite"
    result = invoke("export", layer_module / f"{layer}.keras", "-o", output, "--import", "kbn_litert_layers")
    if code:
        assert_clean_error(result.exit_code, result.stdout, result.stderr)
        assert "LiteRT converter rejects the model: 'tf.MatrixInverse'" in result.stderr
    else:
        assert result.exit_code == 0, result.stderr
    assert output.exists() == (code == 0)


@pytest.mark.slow
def test_installed_script_exports_litert_int8_quietly(model_files, rows, tmp_path):
    args = ("--int8", "--calibration", rows / "calibration.npz", "--min-agreement", "0")
    done = run_script("export", model_files["keras"], "-o", tmp_path / "m.tflite", *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "top-1 agreement" in done.stdout


def _sequential(with_input: bool) -> keras.Model:
    """A small classifier, saved the two ways users build a Sequential: with keras.Input, or built by fit."""
    from tests.helpers import randomize_bn

    layers = [
        keras.layers.Conv2D(4, 3, use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
        keras.layers.BatchNormalization(),
    ]
    keras.utils.set_random_seed(4)  # the kernels' initial values: the same network in any test order
    model = keras.Sequential(([keras.Input((6, 6, 2))] if with_input else []) + layers)
    if not with_input:
        rng = np.random.default_rng(0)
        model.compile("sgd", "mse")
        model.fit(rng.normal(size=(8, 6, 6, 2)).astype("float32"), rng.normal(size=(8, 5)), verbose=0)
    return randomize_bn(model)


@pytest.fixture(scope="module", params=["with_input", "built_by_fit"])
def sequential_file(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"sequential_{request.param}")
    model = _sequential(request.param == "with_input")
    model.save(folder / "seq.keras")
    rng = np.random.default_rng(5)
    # Unnamed arrays (arr_0): a Sequential's input has no name a user would know.
    np.savez(folder / "calibration.npz", rng.normal(size=(64, 6, 6, 2)).astype("float32"))
    return folder / "seq.keras"


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_a_saved_sequential_model_exports(fmt, int8, sequential_file, tmp_path):
    from kerasbn.deploy.target import targets

    output = tmp_path / f"seq{SUFFIXES[fmt]}"
    # A random-weight net is no trained classifier: its arg-max agreement is not the point here.
    calibration = sequential_file.with_name("calibration.npz")
    extra = ("--int8", "--calibration", calibration, "--min-agreement", "0") if int8 else ()
    result = invoke("export", sequential_file, "-o", output, *extra)
    assert result.exit_code == 0, result.stderr
    assert "unexpected" not in result.stderr and f"Wrote {output}" in result.stdout
    # Judged here, independently of the exporter: the file in its own runtime against the original Keras model.
    model = keras.models.load_model(sequential_file)
    x = np.random.default_rng(9).normal(size=(3, 6, 6, 2)).astype("float32")
    expected = np.asarray(model.predict_on_batch(x), np.float64)
    got = np.asarray(targets()[fmt].runner(output, kerasbn.signature(model))([x])[0], np.float64)
    scale = float(np.max(np.abs(expected)))
    if int8:
        # int8 (per-tensor activations over three layers): the error is a fraction of the outputs' spread,
        # judged in RMS, as int8 is (a single output can sit where one activation step is coarse).
        rms = float(np.sqrt(np.mean((got - expected) ** 2)))
        assert rms <= 0.25 * float(np.sqrt(np.mean(expected**2))), (rms, scale)
    else:
        eps = float(np.finfo(np.float32).eps)
        # Two float32 evaluations of a depth-3 network: within a few hundred ulps of max|y|.
        assert float(np.max(np.abs(got - expected))) <= 256 * eps * scale


@pytest.mark.parametrize("dtype", [None, "float16"], ids=["default", "float16"])
@pytest.mark.parametrize("fmt", sorted(SUFFIXES))
def test_a_saved_mixed_precision_model_exports(fmt, dtype, tmp_path):
    from tests.deploy.test_export import _small_cnn

    source = tmp_path / "mixed.keras"
    _small_cnn("mixed_float16").save(source)
    output = tmp_path / f"out{SUFFIXES[fmt]}"
    result = invoke("export", source, "-o", output, *(("--dtype", dtype) if dtype else ()), "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified"] and data["model_dtype"] == "float16" and data["dtype"] == (dtype or "float32")
    table = invoke("export", source, "-o", output, "--force")
    assert "The model computes in float16; the file holds the same weights computed in float32" in table.stdout
