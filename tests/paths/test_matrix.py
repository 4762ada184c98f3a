"""The paths users walk: model kind × dtype policy × where the file was saved × operation × front.

Every cell either passes with its output checked against the original model
(the folded, stripped, swapped or calibrated model reloaded and run; the
exported file run in its own runtime), or is refused with the documented
one-line reason and exit 2 (`REFUSED`); a combination that cannot apply is
listed in `INAPPLICABLE` with why. No cell prints "unexpected".

Dimensions: 8 model kinds × 3 policies × 2 backends (TensorFlow, JAX-saved)
× 17 operations × 2 fronts (the library on the model, the CLI on the saved
file) is 1632 cells (1224 once the inapplicable are taken out), too many for
the suite's time budget, so `CELLS` samples the product deterministically for
``make test`` and the rest (`REST`) is `large`, run by ``make test-large``:

- float32, saved by TensorFlow: every kind × every operation (the
  keras.applications model: six of them, `APPLICATION_OPERATIONS`; an export
  with ``--dtype float16`` on the kinds of `FLOAT16_KINDS`), the front
  alternating between the library and the CLI along each row and column;
- mixed_float16 and mixed_bfloat16, saved by TensorFlow: every operation on
  two kinds (functional, Sequential built by fit), fronts alternating;
- saved by JAX (the suite runs on TensorFlow): every operation on three kinds
  in float32 (but ``--dtype float16``) and on one in mixed_float16, the CLI
  (`JAX_MODELS`);
- quantization-aware training: the handful of cells of `QAT_SAMPLE` (each
  QAT operation once, on the cheap kinds, a JAX-saved file among them, and
  the two refusals); the QAT operations above are not in the rows before.

The diagonal (`DIAGONAL`: every kind, every policy and every operation at least
once, on the cheapest models) runs in ``make test-fast``; the rest is slow.
Measured on the shared two-core machine: the whole matrix 3.7 CPU-minutes
(5.4 min wall, shared with other jobs), the diagonal 32 CPU-seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import pytest

import kerasbn
import kerasbn.qat
from kerasbn.deploy import twins
from kerasbn.deploy.qat_check import MAX_LAYER_LSB, check_file
from kerasbn.deploy.target import targets
from kerasbn.deploy.verify import Checks
from kerasbn.errors import KerasbnError
from kerasbn.folding import plan
from kerasbn.model_signature import signature
from kerasbn.qat import layers as qat_layers
from tests.cli.conftest import invoke
from tests.helpers import ROUNDOFF, assert_matches_original, file_outputs, relative_error
from tests.paths import models

OPERATIONS = (
    "audit",
    "audit_data",
    "audit_quantization",
    "fold",
    "strip_biases",
    "export_onnx",
    "export_litert",
    "int8_onnx",
    "int8_litert",
    "float16_onnx",
    "float16_litert",
    "calibrate",
    "swap",
    "qat_prepare",
    "qat_fit",
    "qat_litert",
    "qat_onnx",
)
# Quantization-aware training: `kerasbn qat` / `kerasbn.qat.prepare` (ranges calibrated), one training step,
# and the QAT model exported as int8 with no calibration (its own grids and ranges).
QAT_OPERATIONS = ("qat_prepare", "qat_fit", "qat_litert", "qat_onnx")
QAT_EXPORTS = {"qat_litert": "litert", "qat_onnx": "onnx"}
CHEAP = ("audit", "fold", "swap")
FRONTS = ("library", "cli")
BACKENDS = ("tensorflow", "jax")
EXPORTS = {
    "export_onnx": "onnx",
    "export_litert": "litert",
    "int8_onnx": "onnx",
    "int8_litert": "litert",
    "float16_onnx": "onnx",
    "float16_litert": "litert",
}


class Cell(NamedTuple):
    kind: str
    policy: str
    backend: str
    operation: str
    front: str

    @property
    def id(self) -> str:
        return "-".join(self)


def _full_product() -> list[Cell]:
    fronts = [(backend, front) for backend in BACKENDS for front in FRONTS]
    return [Cell(k, p, b, op, f) for k in models.KINDS for p in models.POLICIES for b, f in fronts for op in OPERATIONS]


def _sampled() -> list[Cell]:
    cells = []
    for i, kind in enumerate(models.KINDS):
        for j, op in enumerate(OPERATIONS):
            if _in_float32_row(kind, op):
                cells.append(Cell(kind, "float32", "tensorflow", op, FRONTS[(i + j) % 2]))
    rewrites = [op for op in OPERATIONS if op not in QAT_OPERATIONS]
    for policy in models.POLICIES[1:]:
        for i, kind in enumerate(MIXED_KINDS):
            cells += [Cell(kind, policy, "tensorflow", op, FRONTS[(i + j) % 2]) for j, op in enumerate(rewrites)]
    for kind, policy in JAX_MODELS:
        cells += [Cell(kind, policy, "jax", op, "cli") for op in rewrites if policy != "float32" or op not in FLOAT16]
    return cells + list(QAT_SAMPLE)


def _in_float32_row(kind: str, op: str) -> bool:
    if op in QAT_OPERATIONS:
        return False
    if kind == "application":
        return op in APPLICATION_OPERATIONS
    return op not in FLOAT16 or kind in FLOAT16_KINDS


MIXED_KINDS = ("functional", "sequential_fit")
# `--dtype float16` on a float32 model: the kinds whose signatures differ most (the mixed rows have the rest).
FLOAT16 = ("float16_onnx", "float16_litert")
FLOAT16_KINDS = ("sequential_input", "nested", "dict_io", "subclassed")
# MobileNetV2 (52 BN) costs a minute per export or calibration (one pass per BN) on two cores: the
# operations that differ by model kind, not the whole row.
APPLICATION_OPERATIONS = ("audit", "audit_quantization", "fold", "export_onnx", "int8_litert", "swap")

# The JAX-saved files: built in one JAX process per session.
JAX_MODELS = (
    ("sequential_fit", "float32"),
    ("dict_io", "float32"),
    ("subclassed", "float32"),
    ("functional", "mixed_float16"),
)

# QAT in `make test`: one cell per operation, both fronts, a JAX-saved file, and the refusals (a subclassed
# model, a mixed-precision one); each costs a few seconds (an export converts twice: file and check).
QAT_SAMPLE = (
    Cell("functional", "float32", "tensorflow", "qat_prepare", "cli"),
    Cell("sequential_input", "float32", "tensorflow", "qat_fit", "library"),
    Cell("nested", "float32", "tensorflow", "qat_litert", "library"),
    Cell("sequential_fit", "float32", "jax", "qat_onnx", "cli"),
    Cell("subclassed", "float32", "tensorflow", "qat_prepare", "library"),
    Cell("functional", "mixed_float16", "tensorflow", "qat_fit", "cli"),
)

# The cheap cells that cover every kind, policy and operation at least once (`make test-fast`); the front is
# the one `_sampled` gives the cell.
DIAGONAL = {
    ("sequential_input", "float32", "tensorflow", "export_onnx"),
    ("sequential_fit", "float32", "tensorflow", "export_litert"),
    ("functional", "float32", "tensorflow", "int8_onnx"),
    ("nested", "float32", "tensorflow", "strip_biases"),
    ("dict_io", "float32", "tensorflow", "calibrate"),
    ("subclassed", "float32", "tensorflow", "fold"),
    ("application", "float32", "tensorflow", "audit"),
    ("keras_hub", "float32", "tensorflow", "audit_quantization"),
    ("functional", "mixed_float16", "tensorflow", "fold"),
    ("sequential_fit", "mixed_bfloat16", "tensorflow", "int8_litert"),
    ("functional", "mixed_bfloat16", "tensorflow", "audit_data"),
    ("sequential_fit", "mixed_float16", "tensorflow", "swap"),
    ("functional", "mixed_float16", "tensorflow", "float16_onnx"),
    ("sequential_input", "float32", "tensorflow", "float16_litert"),
    ("functional", "float32", "tensorflow", "qat_prepare"),
    ("sequential_input", "float32", "tensorflow", "qat_fit"),
    ("nested", "float32", "tensorflow", "qat_litert"),
    ("sequential_fit", "float32", "jax", "qat_onnx"),
}

# Cells refused by design: (kind, policy, backend, operation, front) with None for "any" → the reason's
# words in the one-line error (exit 2), as docs/limitations.md documents it.
REFUSED: dict[tuple[str | None, ...], str] = {
    **{
        ("subclassed", None, None, op, None): "is subclassed and has no functional graph"
        for op in ("audit_data", "strip_biases", "calibrate", "swap", *QAT_OPERATIONS)
    },
    # The fake-quant grids are float32: a mixed-precision model is quantized from its float32 twin by the user.
    **{
        (None, policy, None, op, None): "quantization-aware training needs a float32 model"
        for policy in models.POLICIES[1:]
        for op in QAT_OPERATIONS
    },
    # keras-hub's CSPNet uses LeakyReLU, whose int8 LiteRT kernel rounds off the trained grid (kerasbn.deploy.qat_int8).
    ("keras_hub", "float32", None, "qat_litert", None): "applies LeakyReLU, which LiteRT's int8 kernel rounds off",
}

# Combinations that cannot apply, and why (none of them is in `CELLS`).
INAPPLICABLE: dict[tuple[str | None, ...], str] = {
    (None, None, "jax", None, "library"): "the suite runs on TensorFlow: a JAX-saved file reaches the library only "
    "loaded from disk, which is what the CLI cell does with the same calls",
}


def _matches(cell: Cell, pattern: tuple[str | None, ...]) -> bool:
    return all(p is None or p == c for p, c in zip(pattern, cell))


def _lookup(table: dict, cell: Cell) -> str | None:
    return next((reason for pattern, reason in table.items() if _matches(cell, pattern)), None)


CELLS = [c for c in _sampled() if _lookup(INAPPLICABLE, c) is None]
# The rest of the product: `make test-large` (``-m large``).
REST = [c for c in _full_product() if _lookup(INAPPLICABLE, c) is None and c not in set(CELLS)]
assert len(set(CELLS)) == len(CELLS) and DIAGONAL <= {c[:4] for c in CELLS}
assert {c[0] for c in DIAGONAL} == set(models.KINDS)
assert {c[1] for c in DIAGONAL} == set(models.POLICIES)
assert {c[3] for c in DIAGONAL} == set(OPERATIONS)


# MobileNetV2's conversions take a minute each: its export cells run in `make test-large`, its audit, fold and
# swap cells in `make test` (the row's kind-specific paths).
LARGE = {("application", op) for op in ("export_onnx", "int8_litert", *QAT_OPERATIONS)}


def _param(cell: Cell, rest: bool = False):
    if cell[:4] in DIAGONAL and not rest:
        return pytest.param(cell, id=cell.id)
    large = (pytest.mark.large,) if rest or (cell[0], cell[3]) in LARGE else ()
    return pytest.param(cell, id=cell.id, marks=(pytest.mark.slow, *large))


def _flat(outputs) -> list[np.ndarray]:
    return [np.asarray(y, np.float64) for y in keras.tree.flatten(outputs)]


def _keras(model, x) -> list[np.ndarray]:
    return _flat(model.predict_on_batch(x))


def _bn_layers(model) -> list:
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True) if plan.is_bn(layer)]


def _weights(model) -> list[np.ndarray]:
    return [np.array(w.numpy()) for w in model.weights]


# ---------------------------------------------------------------------------------------------------------
# One function per operation: run it through the front, return what it produced (a model, a file or a
# report); `_check` holds the assertions per operation, shared by both fronts.


def _data_files(cell: Cell, folder: Path, rows: int, seed: int) -> Path:
    arrays = models.data(cell.kind, rows, seed)
    path = folder / f"data{seed}.npz"
    np.savez(path, **arrays)
    return path


def _cli(cell: Cell, path: Path, folder: Path) -> tuple[int, str, str, Path | None]:
    op = cell.operation
    if op in QAT_OPERATIONS:
        return _qat_cli(cell, path, folder)
    out = None
    if op == "audit":
        args = ["audit", path, "--format", "json"]
    elif op == "audit_data":
        args = ["audit", path, "--format", "json", "--data", _data_files(cell, folder, 64, 1)]
    elif op == "audit_quantization":
        args = ["audit", path, "--format", "json", "--quantization"]
    elif op in ("fold", "strip_biases", "swap"):
        out = folder / "out.keras"
        args = [op.replace("_", "-"), path, "-o", out]
    elif op == "calibrate":
        out = folder / "out.keras"
        data = _data_files(cell, folder, CALIBRATION_ROWS, 1)
        args = ["calibrate", path, "--data", data, "--batch-size", CALIBRATION_ROWS, "-o", out]
    else:
        out = folder / f"out{targets()[EXPORTS[op]].suffix}"
        args = ["export", path, "-o", out]
        if op.startswith("int8"):
            args += ["--int8", "--calibration", _data_files(cell, folder, 64, 1), "--min-agreement", MIN_AGREEMENT]
        if op.startswith("float16"):
            args += ["--dtype", "float16"]
    result = invoke(*args)
    return result.exit_code, result.stdout, result.stderr, out


CALIBRATION_ROWS = 128
# The matrix models are random-weight regressors whose largest outputs are near ties on some rows, so an
# int8 file may flip the top-1 of one row in 64; `_check_int8` judges the file by its error instead.
MIN_AGREEMENT = 0.9


def _library(cell: Cell, model, folder: Path):
    op = cell.operation
    if op in QAT_OPERATIONS:
        return _qat_library(cell, model, folder)
    if op == "audit":
        return kerasbn.audit(model)
    if op == "audit_data":
        return kerasbn.audit_statistics(model, models.as_model_input(cell.kind, models.data(cell.kind, 64, 1)))
    if op == "audit_quantization":
        return kerasbn.audit_quantization(model)
    if op == "fold":
        return kerasbn.fold(model).model
    if op == "strip_biases":
        return kerasbn.strip_redundant_biases(model).model
    if op == "swap":
        return kerasbn.swap(model).model
    if op == "calibrate":
        data = models.as_model_input(cell.kind, models.data(cell.kind, CALIBRATION_ROWS, 1))
        return kerasbn.calibrate(model, data, batch_size=CALIBRATION_ROWS).model
    out = folder / f"out{targets()[EXPORTS[op]].suffix}"
    int8 = models.as_model_input(cell.kind, models.data(cell.kind, 64, 1)) if op.startswith("int8") else None
    dtype = "float16" if op.startswith("float16") else "float32"
    kerasbn.export(model, out, int8=int8, min_agreement=MIN_AGREEMENT, dtype=dtype)
    return out


def _check(cell: Cell, original, produced, x) -> None:
    """The operation's output against the original model (``x``: seeded inputs in the model's structure)."""
    op = cell.operation
    if op in QAT_OPERATIONS:
        _check_qat(cell, original, produced, x)
        return
    bns = _bn_layers(original)
    dtype = twins.compute_dtype(original)
    if op in ("audit", "audit_quantization", "audit_data"):
        report = produced
        if op == "audit":
            assert len(report["batch_norms"]) == len(bns)
            folds = [f for f in report["batch_norms"] if f["foldable"]]
            assert folds, "every matrix model has a BN after a Conv or Dense"
        elif op == "audit_quantization":
            rows = report["quantization"]["layers"]
            assert rows and all(r["ratio_after"] >= 1 and np.isfinite(r["ratio_after"]) for r in rows)
        else:
            rows = report["statistics"]["batch_norms"]
            assert len(rows) == len(bns)
            assert all(np.isfinite(r["mean_shift"]) and r["variance_ratio"] > 0 for r in rows)
        return
    if op in EXPORTS:
        got = file_outputs(produced, EXPORTS[op], original, x)
        if op.startswith("float16"):
            assert "float16" in _weight_dtypes(produced, EXPORTS[op]), "a --dtype float16 file holds float16 weights"
        if op.startswith("int8"):
            _check_int8(original, got, x)
        else:
            # A float16 file (float16 weights; ONNX: float16 arithmetic) is judged in float16 whatever the
            # model's policy, a default export in float32 (the float32 twin of a mixed model).
            assert_matches_original(original, got, x, "float16" if op.startswith("float16") else "float32")
        return
    candidate = produced
    if op == "calibrate":
        _check_calibrated(cell, original, candidate)
        return
    assert_matches_original(original, _keras(candidate, x), x, twins.compute_dtype(candidate))
    assert twins.compute_dtype(candidate) == dtype, "a rewrite keeps the model's dtype policy"
    if op == "fold":
        assert len(_bn_layers(candidate)) < len(bns) or _in_place(candidate)
    if op == "swap":
        assert all(type(bn) is kerasbn.BatchNormalization for bn in _bn_layers(candidate))


def _weight_dtypes(path: Path, fmt: str) -> set[str]:
    """The dtypes of the file's constant tensors, read by the format's own library."""
    if fmt == "onnx":
        import onnx

        return {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in onnx.load(path).graph.initializer}
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(path)).get_tensor_details()
    return {np.dtype(d["dtype"]).name for d in details}


def _in_place(model) -> bool:
    """A fold in place leaves each folded BN as an exact identity (γ = 1, β = 0, μ = 0)."""
    return any(np.all(np.asarray(bn.moving_mean) == 0) for bn in _bn_layers(model))


# An int8 file quantizes every weight and activation to 1/127 of its range; through the few layers of the
# matrix models the outputs move by a few steps. A file that is wrong (a weight off by 10 %, a lost bias)
# moves them by far more. RMS relative to the outputs' RMS:
INT8_RMS = 0.25


def _check_int8(original, got: list[np.ndarray], x) -> None:
    want = _keras(original, x)
    for y, z in zip(want, got):
        assert y.shape == z.shape
        rms = float(np.sqrt(np.mean((y - z) ** 2)) / max(np.sqrt(np.mean(y**2)), 1e-30))
        assert rms <= INT8_RMS, f"int8 file: RMS error {rms:.3g} of the outputs' RMS > {INT8_RMS}"


# ---------------------------------------------------------------------------------------------------------
# Quantization-aware training: the QAT model (and what was done with it) is the product of the cell.


class QatProduct(NamedTuple):
    model: object  # the QAT model, after its training step for qat_fit
    file: Path | None = None  # the int8 file of an export; the model saved after its step for qat_fit
    loss: object = None  # qat_fit: what train_on_batch returned
    before: list[np.ndarray] | None = None  # qat_fit: the trainable weights before the step


QAT_CALIBRATION_ROWS = 64
# Output steps (of the output's 8-bit quantizer) an int8 file may differ from the QAT model it was written
# from, per element: the budget (integer requantization after each layer against one float rounding).
QAT_MAX_LSB = 2


def _qat_library(cell: Cell, model, folder: Path) -> QatProduct:
    calibration = models.as_model_input(cell.kind, models.data(cell.kind, QAT_CALIBRATION_ROWS, 1))
    qat = kerasbn.qat.prepare(model, calibration=calibration)
    if cell.operation == "qat_fit":
        return _fit_step(cell, qat, folder)
    if cell.operation in QAT_EXPORTS:
        out = folder / f"out.int8{targets()[QAT_EXPORTS[cell.operation]].suffix}"
        kerasbn.export(qat, out)
        return QatProduct(qat, out)
    return QatProduct(qat)


def _qat_cli(cell: Cell, path: Path, folder: Path) -> tuple[int, str, str, Path]:
    """`kerasbn qat` on the file; for an export cell then `kerasbn export` of the QAT file, no calibration."""
    qat_path = folder / "out.qat.keras"
    data = _data_files(cell, folder, QAT_CALIBRATION_ROWS, 1)
    prepared = invoke("qat", path, "-o", qat_path, "--calibration", data)
    if prepared.exit_code != 0 or cell.operation not in QAT_EXPORTS:
        return prepared.exit_code, prepared.stdout, prepared.stderr, qat_path
    out = folder / f"out.int8{targets()[QAT_EXPORTS[cell.operation]].suffix}"
    exported = invoke("export", qat_path, "-o", out)
    return exported.exit_code, prepared.stdout + exported.stdout, prepared.stderr + exported.stderr, out


def _qat_from_cli(cell: Cell, out: Path, folder: Path) -> QatProduct:
    """What the CLI cell produced: the QAT file loaded (then trained one step, as a user's script would)."""
    if cell.operation in QAT_EXPORTS:
        return QatProduct(kerasbn.load_model(folder / "out.qat.keras"), out)
    qat = kerasbn.load_model(out)
    return _fit_step(cell, qat, folder) if cell.operation == "qat_fit" else QatProduct(qat)


def _fit_step(cell: Cell, qat, folder: Path) -> QatProduct:
    """One ``train_on_batch`` step (SGD, mean squared error to zero targets), then the model saved."""
    x = models.as_model_input(cell.kind, models.data(cell.kind, 16, 2))
    targets_ = keras.tree.map_structure(lambda y: np.zeros(y.shape, "float32"), qat.predict_on_batch(x))
    loss = {"score": "mse", "embedding": "mse"} if cell.kind == "dict_io" else "mse"
    qat.compile(optimizer=keras.optimizers.SGD(1e-2), loss=loss)
    before = [np.array(w.numpy()) for w in qat.trainable_weights]
    result = qat.train_on_batch(x, targets_)
    path = folder / "trained.qat.keras"
    qat.save(path)
    return QatProduct(qat, path, result, before)


def _check_qat(cell: Cell, original, produced: QatProduct, x) -> None:
    """The QAT model fuses every BN; its outputs (or the int8 file's) near the float model's, the file's
    within `QAT_MAX_LSB` output steps of the QAT model's; a training step moves the weights and survives saving.
    """
    qat = produced.model
    want = _keras(qat, x)
    fused = qat_layers.fused(qat)
    # Every BN of the matrix models follows its Conv or Dense: each becomes one fused layer.
    assert len(fused) == len(_bn_layers(original)) and not _bn_layers(qat), (len(fused), len(_bn_layers(qat)))
    if cell.operation == "qat_prepare":
        _check_int8(original, want, x)  # calibrated and untrained: the post-training-quantized model
    elif cell.operation == "qat_fit":
        assert all(np.all(np.isfinite(v)) for v in keras.tree.flatten(produced.loss)), produced.loss
        moved = [not np.array_equal(a, w.numpy()) for a, w in zip(produced.before, qat.trainable_weights)]
        assert any(moved), "a training step moved no weight"
        for a, b in zip(want, _keras(kerasbn.load_model(produced.file), x)):
            np.testing.assert_array_equal(a, b, err_msg="the trained QAT model reloads with other outputs")
    else:
        fmt = QAT_EXPORTS[cell.operation]
        got = file_outputs(produced.file, fmt, qat, x)
        lsb = max(float(np.max(np.abs(y - z))) / step for y, z, step in zip(want, got, _output_steps(qat)))
        if lsb > QAT_MAX_LSB + 1e-3:
            # Through a deep network (keras-hub's CSPNet) one-step rounding flips add up past the budget; the file is
            # then judged layer by layer on the file's own inputs (tests/deploy/test_qat_int8.py shows that judgement
            # refusing a file with one bias three steps off).
            layers = check_file(qat, fmt, produced.file.read_bytes(), signature(qat), Checks(inputs=x)).outputs[0]
            assert layers.layer_lsb is not None and layers.layer_lsb <= MAX_LAYER_LSB + 1e-3, (
                f"int8 file: {lsb:.3g} output steps from the QAT model, {layers.worst_layer} {layers.layer_lsb} steps"
            )
        else:
            assert lsb <= QAT_MAX_LSB + 1e-3, f"int8 file: {lsb:.3g} output steps from the QAT model"
        _check_int8(original, got, x)


def _output_steps(qat) -> list[float]:
    """Each output's grid step: that of the activation quantizer it comes from (through pass-through layers)."""
    steps = []
    for tensor in qat.outputs:
        layer = tensor._keras_history.operation
        while not isinstance(layer, qat_layers.ActivationQuantizer):
            layer = layer.input._keras_history.operation
        lo, hi = (float(v) for v in keras.ops.convert_to_numpy(layer.nudged_range())[:2])
        steps.append((hi - lo) / (2**layer.bits - 1))
    return steps


def _check_calibrated(cell: Cell, original, calibrated) -> None:
    """Calibrated on one batch of data, the model in inference is the original in training mode on that batch.

    Both normalize each BN's input by the statistics of that batch, through BNs normalized the same way,
    except that calibration stores the unbiased variance m/(m−1)·σ²_B: each BN's output scales by
    √((m−1)/m), at most 1/(2(m−1)) relative with m ≥ the number of rows.
    """
    data = models.as_model_input(cell.kind, models.data(cell.kind, CALIBRATION_ROWS, 1))
    fresh = _clone(original)
    training = _flat(fresh(data, training=True))
    inference = _keras(calibrated, data)
    n = len(_bn_layers(original))
    bound = n / (2 * (CALIBRATION_ROWS - 1)) + 64 * ROUNDOFF[twins.compute_dtype(original)] * n
    err = relative_error(training, inference)
    assert err <= bound, f"calibrated vs training mode on the data: {err:.3g} > {bound:.3g}"


def _clone(model):
    """A copy to run in training mode (which updates the moving statistics it is given)."""
    with keras.utils.custom_object_scope({"ConvNet": models.ConvNet}):
        copy = keras.models.clone_model(model) if not isinstance(model, models.ConvNet) else None
    if copy is None:
        copy = models.ConvNet.from_config(model.get_config())
        copy(keras.ops.zeros((1, *models.IMAGE)))
    copy.set_weights(model.get_weights())
    return copy


@pytest.mark.parametrize("cell", [_param(c) for c in CELLS] + [_param(c, rest=True) for c in REST])
def test_user_path(cell: Cell, path_models, tmp_path):
    path = path_models.path(cell.kind, cell.policy, cell.backend)
    reference = kerasbn.load_model(path)
    before = _weights(reference)
    x = models.as_model_input(cell.kind, models.data(cell.kind, 3, 7))
    refusal = _lookup(REFUSED, cell)
    if cell.front == "library":
        model = path_models.model(cell.kind, cell.policy)
        in_memory = _weights(model)
        if refusal is not None:
            with pytest.raises(KerasbnError, match=re.escape(refusal)):
                _library(cell, model, tmp_path)
            return
        produced = _library(cell, model, tmp_path)
        if cell.operation.startswith("audit"):
            produced = _report_dict(cell.operation, produced)
        for a, b in zip(in_memory, _weights(model)):
            np.testing.assert_array_equal(a, b, err_msg="the library changed its input model")
    else:
        code, stdout, stderr, out = _cli(cell, path, tmp_path)
        assert "unexpected" not in stdout + stderr
        if refusal is not None:
            assert code == 2, (code, stdout, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("kerasbn: error: ") and refusal in lines[0], stderr
            assert out is None or not out.exists(), "nothing is written on a refusal"
            return
        assert code == 0, (code, stdout, stderr)
        if cell.operation.startswith("audit"):
            produced = json.loads(stdout)
        elif cell.operation in QAT_OPERATIONS:
            produced = _qat_from_cli(cell, out, tmp_path)
        elif cell.operation in EXPORTS:
            produced = out
        else:
            produced = kerasbn.load_model(out)
    for a, b in zip(before, _weights(kerasbn.load_model(path))):
        np.testing.assert_array_equal(a, b, err_msg="the input file changed")
    _check(cell, reference, produced, x)


def _report_dict(op: str, report) -> dict:
    """The library's report as the CLI's JSON has it."""
    if op == "audit":
        return report.to_dict()
    if op == "audit_quantization":
        return {"quantization": report.to_dict()}
    return {"statistics": report.to_dict()}
