"""int8 export of quantization-aware models: the file holds the trained grid and computes the simulated model.

The references are independent of the exporter's own check: the runtime's
outputs against the QAT model's Keras outputs, in steps of its output
quantizer; the integers read back through the LiteRT interpreter and the
ONNX initializers, laid out by hand per kernel kind, against `weight_grid`;
ONNX Runtime's own optimized graph for the integer kernels.
"""

from __future__ import annotations

import os
import re
import textwrap

import keras
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sklearn.datasets import load_digits

import kerasbn
import kerasbn.deploy.qat_int8 as qat_export
from kerasbn.deploy.files import load_model
from kerasbn.deploy.int8_file import litert_weights
from kerasbn.deploy.qat_check import MAX_LAYER_LSB, check_file, output_steps
from kerasbn.deploy.verify import Checks, keras_outputs
from kerasbn.errors import UnsupportedModelError
from kerasbn.model_signature import signature
from kerasbn.qat import layers as qlayers
from kerasbn.qat.quantizers import nudged_range, weight_grid
from tests.cli.conftest import assert_clean_error, invoke, run_script
from tests.helpers import file_outputs, randomize_biases, randomize_bn

SUFFIX = {"litert": ".tflite", "onnx": ".onnx"}
# The runtimes requantize after every layer where the simulation rounds once: 2 output steps (kerasbn.qat.export).
MAX_STEPS = 2.0
# |Δ| / step of an exact multiple of the step, computed from float32 outputs.
STEP_SLACK = 1e-3


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, held-out x, held-out y): scikit-learn's digits as (8, 8, 1) images in [0, 1], 450 held out."""
    data = load_digits()
    x = (data.images[..., None] / 16.0).astype("float32")
    order = np.random.default_rng(seed).permutation(len(x))
    train, held = order[:-450], order[-450:]
    return x[train], data.target[train], x[held], data.target[held]


def float_model(seed: int = 0, width: int = 8) -> keras.Model:
    """Conv+BN+ReLU → DepthwiseConv+BN+ReLU → 1×1 Conv+BN+ReLU → average pool → Dense: the depthwise-separable net's parts."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="digits")
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(2 * width, 1)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    return randomize_bn(randomize_biases(keras.Model(inputs, outputs, name="digits_net"), seed), seed)


@pytest.fixture(scope="module")
def qat_file(tmp_path_factory):
    """A quantization-aware model (ranges from digits, no training: the export does not need it) saved as .keras."""
    train, _, _, _ = digits()
    model = kerasbn.qat.prepare(float_model(), calibration=train[:256])
    path = tmp_path_factory.mktemp("qat") / "digits.qat.keras"
    model.save(path)
    return path


def output_step(model: keras.Model) -> float:
    """The step of the model's output quantizer (TensorFlow's nudged range over 255 steps)."""
    quantizer = model.layers[-1]
    assert isinstance(quantizer, qlayers.ActivationQuantizer)
    lo, hi, _ = nudged_range(np.float32(quantizer.range_min), np.float32(quantizer.range_max), quantizer.bits)
    return (float(hi) - float(lo)) / (2**quantizer.bits - 1)


def assert_simulated(model: keras.Model, path, fmt: str, x: np.ndarray) -> None:
    """The file's outputs within MAX_STEPS output steps of the simulated model, the same class where decisive."""
    expected = keras_outputs(model, x)[0]
    got = file_outputs(path, fmt, model, x)[0]
    step = output_step(model)
    assert np.max(np.abs(got - expected)) <= (MAX_STEPS + STEP_SLACK) * step
    top_two = np.sort(expected, axis=-1)[:, -2:]
    decisive = top_two[:, 1] - top_two[:, 0] > 2 * MAX_STEPS * step
    assert decisive.mean() > 0.5  # the top-1 comparison below is over most rows
    assert np.array_equal(np.argmax(got, -1)[decisive], np.argmax(expected, -1)[decisive])


def expected_layouts(layer) -> list[tuple[np.ndarray, np.ndarray]]:
    """(integers, scales) of each kernel of ``layer`` in the runtimes' layouts: LiteRT's first, then ONNX's."""
    q, scale, _ = weight_grid(layer)
    kind = layer.kernels.kind
    if kind == "dense":  # LiteRT FULLY_CONNECTED (out, in); ONNX Gemm B (in, out)
        return [(q.T, scale), (q, scale)]
    if kind == "depthwise":  # (kh, kw, in·mult): LiteRT (1, kh, kw, in·mult); ONNX (in·mult, 1, kh, kw)
        return [(q[None], scale), (np.moveaxis(q, -1, 0)[:, None], scale)]
    # Conv (kh, kw, in, out): LiteRT (out, kh, kw, in); ONNX (out, in, kh, kw)
    return [(q.transpose(3, 0, 1, 2), scale), (q.transpose(3, 2, 0, 1), scale)]


def litert_kernels(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(integers, scales) of every kernel input of the LiteRT interpreter's convolutions and fully connected ops."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    found = []
    for op in interpreter._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            index = op["inputs"][1]
            assert details[index]["dtype"] == np.int8, op["op_name"]
            found.append((interpreter.get_tensor(index), details[index]["quantization_parameters"]["scales"]))
    return found


def onnx_kernels(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(integers, scales) of the DequantizeLinear feeding each Conv/Gemm/MatMul weight of the ONNX file."""
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            dq = producer[node.input[1]]
            assert dq.op_type == "DequantizeLinear" and init[dq.input[0]].dtype == np.int8, node.name
            found.append((init[dq.input[0]], init[dq.input[1]]))
    return found


def assert_trained_grid(model: keras.Model, path, fmt: str) -> None:
    """Every quantized kernel's integers are in the file exactly, with its scales to float32 rounding."""
    kernels = litert_kernels(path) if fmt == "litert" else onnx_kernels(path)
    quantized = qlayers.weight_quantized(model)
    assert len(kernels) == len(quantized)
    for layer in quantized:
        q, scale = expected_layouts(layer)[0 if fmt == "litert" else 1]
        assert any(
            v.shape == q.shape and np.array_equal(v, q) and np.allclose(np.ravel(s), np.ravel(scale), rtol=1e-6)
            for v, s in kernels
        ), layer.name


@pytest.fixture(scope="module")
def int8_files(qat_file, tmp_path_factory):
    """The int8 LiteRT and ONNX files `kerasbn.export` writes from the saved QAT model (library, no calibration)."""
    model = load_model(qat_file)
    _, _, held, _ = digits()
    folder = tmp_path_factory.mktemp("int8")
    files = {}
    for fmt in SUFFIX:
        path = folder / f"digits.int8{SUFFIX[fmt]}"
        result = kerasbn.export(model, path, checks=Checks(inputs=held))
        assert isinstance(result, qat_export.QatExportResult) and result.verified and path.exists()
        files[fmt] = path
    return files


@pytest.mark.parametrize("fmt", ["litert", "onnx"])
def test_int8_file_of_a_saved_qat_model_is_the_simulated_model(qat_file, int8_files, fmt):
    model = load_model(qat_file)
    _, _, held, _ = digits()
    assert_simulated(model, int8_files[fmt], fmt, held)
    assert_trained_grid(model, int8_files[fmt], fmt)


def test_onnx_runtime_runs_integer_kernels(int8_files, tmp_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8_files["onnx"]), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 1
    assert not {"Conv", "Gemm", "MatMul"} & set(ops)


def one_step_off(path, which: int) -> keras.Model:
    """The model of ``path`` with activation quantizer ``which`` given a range one step wider."""
    model = load_model(path)
    quantizer = qlayers.activation_quantizers(model)[which]
    _, _, step = nudged_range(np.float32(quantizer.range_min), np.float32(quantizer.range_max))
    quantizer.range_max.assign(np.float32(float(np.asarray(quantizer.range_max)) + float(step)))
    return model


@pytest.mark.parametrize("which", [0, 2, -1], ids=["input", "hidden", "output"])
@pytest.mark.parametrize("fmt", ["litert", "onnx"])
def test_the_check_detects_a_range_one_step_off(qat_file, int8_files, fmt, which):
    changed = one_step_off(qat_file, which)
    sig = signature(changed)
    check = check_file(changed, fmt, int8_files[fmt].read_bytes(), sig, Checks())
    assert not check.passed
    name = qlayers.activation_quantizers(changed)[which].name
    assert any(f"activation quantizer '{name}'" in problem for problem in check.problems), check.problems
    unchanged = check_file(load_model(qat_file), fmt, int8_files[fmt].read_bytes(), sig, Checks())
    assert unchanged.passed, unchanged.failure()


def converting(monkeypatch, model: keras.Model) -> None:
    """Make the exporter convert ``model`` (whatever it is given) and check the file against what it was given."""
    convert = qat_export.convert
    monkeypatch.setattr(qat_export, "convert", lambda _model, *args, **kwargs: convert(model, *args, **kwargs))


def test_nothing_is_written_when_the_file_is_not_the_model(qat_file, tmp_path, monkeypatch):
    converting(monkeypatch, one_step_off(qat_file, 1))
    path = tmp_path / "m.tflite"
    with pytest.raises(qat_export.QatVerificationError, match="is not in the file; nothing written"):
        kerasbn.export(load_model(qat_file), path)
    assert not path.exists()


def test_cli_exits_1_when_the_file_is_not_the_model(qat_file, tmp_path, monkeypatch):
    converting(monkeypatch, one_step_off(qat_file, -1))
    result = invoke("export", qat_file, "-o", tmp_path / "m.onnx")
    assert_clean_error(result.exit_code, result.stdout, result.stderr, exit_code=1)
    assert "is not the quantization-aware model" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_cli_reports_the_integer_kernels_as_json(qat_file, tmp_path):
    import json

    output = tmp_path / "digits.int8.onnx"
    result = invoke("export", qat_file, "-o", output, "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["quantization_aware"] and report["verified"] and report["path"] == str(output)
    assert report["runtime_op_counts"]["QLinearConv"] == 3 and report["check"]["problems"] == []
    assert all(case["max_lsb"] <= MAX_STEPS + STEP_SLACK for case in report["check"]["outputs"])


@pytest.mark.large
def test_cli_exports_a_qat_file_as_int8_without_calibration(qat_file, tmp_path):
    _, _, held, _ = digits()
    inputs = tmp_path / "held.npz"
    np.savez(inputs, digits=held)
    for fmt, kernels in (("onnx", "QLinearConv 3"), ("litert", "Integer weights equal to the trained grid: 4")):
        output = tmp_path / f"digits.int8{SUFFIX[fmt]}"
        done = run_script("export", qat_file, "-o", output, "--inputs", inputs, timeout=300)
        assert done.returncode == 0, done.stderr
        assert kernels in done.stdout and f"Wrote {output}" in done.stdout
        assert_simulated(load_model(qat_file), output, fmt, held)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--int8", "--calibration", "CALIBRATION"), "give no calibration data"),
        (("--dtype", "float16"), "kerasbn.qat.convert"),
        (("--opset", "11"), "opset 13 or later"),
        (("--compare-unfolded",), "no BN to fold"),
        (("--int8",), "a quantization-aware model needs neither"),
    ],
)
def test_cli_refuses_float_and_calibration_options_for_a_qat_file(qat_file, tmp_path, args, message):
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, digits=digits()[0][:8])
    args = [str(calibration) if a == "CALIBRATION" else a for a in args]
    result = invoke("export", qat_file, "-o", tmp_path / "m.onnx", *args)
    assert_clean_error(result.exit_code, result.stdout, result.stderr)
    assert message in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_litert_refuses_weights_below_four_bits(tmp_path):
    train, _, _, _ = digits()
    model = kerasbn.qat.prepare(float_model(), calibration=train[:64], weight_bits=3)
    with pytest.raises(UnsupportedModelError, match="3-bit weights, which LiteRT's converter stores on the 4-bit grid"):
        kerasbn.export(model, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.large
@pytest.mark.parametrize(("fmt", "bits"), [("litert", 4), ("onnx", 4), ("onnx", 3)])
def test_low_bit_weights_stay_on_their_grid(tmp_path, fmt, bits):
    train, _, held, _ = digits()
    model = kerasbn.qat.prepare(float_model(), calibration=train[:256], weight_bits=bits)
    path = tmp_path / f"m{SUFFIX[fmt]}"
    kerasbn.export(model, path, checks=Checks(inputs=held))
    assert_simulated(model, path, fmt, held)
    grids = [weight_grid(layer)[0] for layer in qlayers.weight_quantized(model)]
    assert max(int(np.abs(q).max()) for q in grids) == 2 ** (bits - 1) - 1
    if fmt == "onnx":  # LiteRT stores 4-bit kernels as INT4, which the interpreter API does not read back
        assert_trained_grid(model, path, fmt)


def train_qat(seed: int) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """The digits net trained in float, prepared from its calibration, trained quantization-aware and frozen."""
    train, labels, held, held_labels = digits(seed)
    model = float_model(seed, width=32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(train, labels, epochs=30, batch_size=64, verbose=0)
    qat = kerasbn.qat.prepare(model, calibration=train[:256], freeze_after=100)
    qat.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    qat.fit(train, labels, epochs=5, batch_size=64, verbose=0)
    return qat, held, held_labels


@pytest.mark.large
@pytest.mark.parametrize("seed", [0, 1])
def test_trained_qat_model_exports_with_full_top1_agreement(tmp_path, seed):
    qat, held, held_labels = train_qat(seed)
    saved = tmp_path / "digits.qat.keras"
    qat.save(saved)
    model = load_model(saved)
    simulated = np.argmax(keras_outputs(model, held)[0], -1)
    assert np.mean(simulated == held_labels) > 0.9  # trained: its classes have margins
    for fmt in ("litert", "onnx"):
        path = tmp_path / f"digits.int8{SUFFIX[fmt]}"
        kerasbn.export(model, path, checks=Checks(inputs=held))
        assert_simulated(model, path, fmt, held)
        assert_trained_grid(model, path, fmt)
        got = np.argmax(file_outputs(path, fmt, model, held)[0], -1)
        assert np.array_equal(got, simulated)


JAX_SCRIPT = textwrap.dedent(
    """
    import sys
    import keras, numpy as np
    import kerasbn
    from tests.deploy.test_qat_int8 import digits, float_model

    train, labels, _, _ = digits()
    qat = kerasbn.qat.prepare(float_model(), calibration=train[:256])
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(train, labels, epochs=1, batch_size=64, verbose=0)
    qat.save(sys.argv[1])
    """
)


@pytest.mark.large
def test_a_qat_model_trained_and_saved_on_jax_exports_on_tensorflow(tmp_path):
    import subprocess
    import sys

    saved = tmp_path / "jax.qat.keras"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(saved)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model = load_model(saved)
    _, _, held, _ = digits()
    for fmt in ("litert", "onnx"):
        path = tmp_path / f"jax.int8{SUFFIX[fmt]}"
        kerasbn.export(model, path, checks=Checks(inputs=held))
        assert_simulated(model, path, fmt, held)
        assert_trained_grid(model, path, fmt)


def test_litert_file_holds_a_folded_kernel_on_its_grid_to_the_bit(tmp_path):
    # The converter used to fold W·γ/√(σ² + ε) with its own float32 arithmetic, a few ulps from the
    # model's: its scales differed in the last bits, and a weight near half a step rounded the other way.
    keras.utils.set_random_seed(3)
    x = keras.Input((4, 4, 16))
    conv, bn = keras.layers.Conv2D(256, 1, use_bias=False), keras.layers.BatchNormalization()
    model = keras.Model(x, bn(conv(x)))
    randomize_bn(model, seed=3)
    calibration = np.random.default_rng(4).normal(size=(8, 4, 4, 16)).astype("float32")
    qat = kerasbn.qat.prepare(model, calibration=calibration)
    content, _ = qat_export.convert(qat, "litert")
    (tensor,) = [t for t in litert_weights(content) if t.op == "CONV_2D"]
    (layer,) = qlayers.fused(qat)
    q, scale, _ = weight_grid(layer)
    np.testing.assert_array_equal(tensor.scale, scale)
    np.testing.assert_array_equal(tensor.values, np.moveaxis(q, -1, 0))


@pytest.mark.parametrize("fmt", ["litert", "onnx"])
def test_a_split_keeps_one_range_for_all_its_outputs(tmp_path, fmt):
    # LiteRT's SPLIT requires its outputs on its input's scale to the bit: no quantizer of their own.
    keras.utils.set_random_seed(5)
    x = keras.Input((6, 6, 3))
    y = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3, padding="same")(x)))
    left, right = keras.ops.split(y, 2, axis=-1)
    right = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1)(right)))
    model = keras.Model(x, keras.layers.Concatenate()([left, right]))
    randomize_bn(model, seed=5)
    calibration = np.random.default_rng(6).normal(size=(16, 6, 6, 3)).astype("float32")
    qat = kerasbn.qat.prepare(model, calibration=calibration)
    assert not [name for name in qat.qat_preparation.activation_quantizers if "split" in name]
    path = tmp_path / f"m{SUFFIX[fmt]}"
    kerasbn.export(qat, path)
    expected = keras_outputs(qat, calibration)[0]
    got = file_outputs(path, fmt, qat, calibration)[0]
    assert np.max(np.abs(got - expected)) <= (MAX_STEPS + STEP_SLACK) * output_step(qat)


def test_an_activation_the_kernel_does_not_fuse_reads_a_quantized_input(tmp_path):
    # LiteRT fuses only ReLU/ReLU6 into an int8 CONV_2D; before a LEAKY_RELU it left the convolution float
    # when the conv output had no range of its own.
    keras.utils.set_random_seed(7)
    x = keras.Input((6, 6, 3))
    y = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x))
    model = keras.Model(x, keras.layers.LeakyReLU(negative_slope=0.1)(y))
    randomize_bn(model, seed=7)
    calibration = np.random.default_rng(8).normal(size=(16, 6, 6, 3)).astype("float32")
    qat = kerasbn.qat.prepare(model, calibration=calibration)
    assert [type(layer).__name__ for layer in qat.layers][2:] == [
        "ConvBatchNorm",
        "ActivationQuantizer",
        "LeakyReLU",
        "ActivationQuantizer",
    ]
    content, _ = qat_export.convert(qat, "litert")
    (tensor,) = [t for t in litert_weights(content) if t.op == "CONV_2D"]
    q, _, _ = weight_grid(qlayers.fused(qat)[0])
    np.testing.assert_array_equal(tensor.values, np.moveaxis(q, -1, 0))


def test_a_leaky_relu_is_refused_for_litert_and_exported_to_onnx(tmp_path):
    # LiteRT's int8 LEAKY_RELU rounds negative inputs off the simulation's grid (kerasbn.deploy.qat_int8._refuse_unfaithful).
    keras.utils.set_random_seed(9)
    x = keras.Input((6, 6, 3))
    y = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x))
    model = keras.Model(x, keras.layers.GlobalAveragePooling2D()(keras.layers.LeakyReLU(negative_slope=0.1)(y)))
    randomize_bn(model, seed=9)
    calibration = np.random.default_rng(10).normal(size=(16, 6, 6, 3)).astype("float32")
    qat = kerasbn.qat.prepare(model, calibration=calibration)
    with pytest.raises(UnsupportedModelError, match="LeakyReLU"):
        kerasbn.export(qat, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()
    kerasbn.export(qat, tmp_path / "m.onnx")
    expected = keras_outputs(qat, calibration)[0]
    got = file_outputs(tmp_path / "m.onnx", "onnx", qat, calibration)[0]
    assert np.max(np.abs(got - expected)) <= (MAX_STEPS + STEP_SLACK) * output_step(qat)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("leaky_relu", "onnx"), id="leaky_relu-onnx"),
        # The same check through the other format and kernel: make test-large.
        pytest.param(("relu", "onnx"), id="relu-onnx", marks=pytest.mark.large),
        pytest.param(("relu", "litert"), id="relu-litert", marks=pytest.mark.large),
    ],
)
def deep_qat(request):
    """keras-hub's CSPNet (13 convolutions, residual adds, concatenations), calibrated, with its int8 file's bytes.

    LeakyReLU as keras-hub builds it, for ONNX (LiteRT refuses it), and ReLU for both formats.
    """
    from tests.keras_hub_models import trained_like
    from tests.paths import models

    activation, fmt = request.param
    keras.utils.set_random_seed(1)
    model = trained_like(models.keras_hub(activation), 1)
    qat = kerasbn.qat.prepare(model, calibration=models.data("keras_hub", 64, 1)["image"])
    x = models.data("keras_hub", 64, 2)["image"]
    graph, _ = qat_export.convert(qat, fmt)
    content = graph if fmt == "litert" else graph.SerializeToString()
    return qat, fmt, content, x


def test_a_deep_network_is_judged_layer_by_layer_where_rounding_flips_add_up(deep_qat, tmp_path):
    qat, fmt, content, x = deep_qat
    path = tmp_path / f"m{SUFFIX[fmt]}"
    path.write_bytes(content)
    step = output_steps(qat)[0]
    end_to_end = np.max(np.abs(file_outputs(path, fmt, qat, x)[0] - keras_outputs(qat, x)[0])) / step
    assert end_to_end > MAX_STEPS + STEP_SLACK  # the outputs alone would refuse the file: the case is not vacuous
    check = check_file(qat, fmt, content, signature(qat), Checks(inputs=x))
    assert check.passed, check.failure()
    judged = check.outputs[0]
    assert judged.max_lsb == pytest.approx(end_to_end, rel=1e-6)
    # Every activation quantizer found in the file, and the output, each within one step of the simulated layer.
    assert judged.layers == len(qlayers.activation_quantizers(qat)) + 1
    assert judged.layer_lsb <= MAX_LAYER_LSB + STEP_SLACK


def test_layer_by_layer_names_a_layer_whose_bias_is_off(deep_qat):
    qat, fmt, _, x = deep_qat
    wrong = keras.models.clone_model(qat)
    wrong.set_weights(qat.get_weights())
    fused = qlayers.fused(wrong)[-1]  # the last convolution: its quantizer, or its activation's, makes the output
    fused.beta.assign(fused.beta.numpy() + 6 * output_steps(qat)[0])
    graph, _ = qat_export.convert(wrong, fmt)
    content = graph if fmt == "litert" else graph.SerializeToString()
    check = check_file(qat, fmt, content, signature(qat), Checks(inputs=x))
    assert not check.passed
    assert check.outputs[0].layer_lsb > 2  # six output steps of bias, at least two of the quantizer it reaches first
    pattern = r"layer 'stage_1_csp_(conv_transition|transition_activation)_quant' fed the file's own inputs"
    assert re.search(pattern, check.failure()), check.failure()
