"""The `kerasbn` command group.

Only click is imported at module level: `kerasbn --help` and `--version` must
not pay for importing TensorFlow. Each command parses, calls the library,
prints and returns an exit code; the library does the work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click

from kerasbn_cli import quiet
from kerasbn_cli.options import (
    EXIT_FINDINGS,
    EXIT_OK,
    MODEL_ARGUMENT,
    Checking,
    DataOptions,
    Settings,
    calibration_option,
    common_options,
    compare_unfolded_option,
    data_options,
    dtype_option,
    export_to_option,
    fold_option,
    format_option,
    freeze_after_option,
    int8_option,
    min_agreement_option,
    mode_option,
    opset_option,
    output_option,
    per_tensor_option,
    qat_calibration_option,
    quantization_option,
    strict_option,
    swap_to_option,
    unbiased_option,
    verify_options,
    weight_bits_option,
)

# Before TensorFlow is first imported (inside the commands): its C++ log noise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REWRITE_CHECK = "Compare the new model with the original, in memory and as reloaded from disk."


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version("kerasbn"), prog_name="kerasbn")
def main() -> None:
    """Audit, fold and export Batch Normalization in Keras 3 models.

    \b
    Exit status: 0 success; 1 verification failed or --strict findings;
    2 bad usage, or an input that cannot be read or is not supported.
    """


@main.command()
@MODEL_ARGUMENT
@format_option("markdown")
@strict_option
@quantization_option
@data_options(required=False)
@common_options
def audit(settings: Settings, model: Path, fmt: str, strict: bool, quantization: bool, data: DataOptions) -> int:
    """List each BatchNormalization layer of MODEL, its partner, whether it folds and why not.

    Also lists the Dense/Conv biases that a following BN makes redundant, and
    totals. With --data, also compares each BN's stored statistics with the
    population statistics of that data (mean shift in σ, variance ratio) and
    flags stale ones. For a quantization-aware model (kerasbn qat), also lists
    its quantizers, their bits and ranges. Changes nothing.

    \b
    Example:
      kerasbn audit model.keras --format markdown >> $GITHUB_STEP_SUMMARY
      kerasbn audit model.keras --strict -q || echo "model has foldable BN"
      kerasbn audit model.keras --quantization
      kerasbn audit model.keras --data new_images/ --format json
    """
    from kerasbn_cli import render

    stale = ranges = None
    with render.progress(settings.quiet, bar=data.path is not None) as progress:
        import kerasbn

        progress.step(f"Loading {model.name}")
        keras_model = kerasbn.load_model(model, safe_mode=settings.safe_mode, custom_modules=settings.imports)
        batches = _open_data(data, keras_model)
        progress.step("Auditing")
        report = kerasbn.audit(keras_model)
        if quantization:
            from kerasbn.deploy.quantize import audit_quantization

            progress.step("Folding to measure the weight ranges")
            ranges = audit_quantization(keras_model)
        if batches is not None:
            progress.step("Measuring BN statistics on the data")
            stale = kerasbn.audit_statistics(keras_model, batches, on_batch=progress.advance)
        quantizers = kerasbn.qat.audit(keras_model) if kerasbn.qat.is_qat(keras_model) else None
    if not settings.quiet:
        render.print_audit(report, fmt, {"quantization": ranges, "statistics": stale, "qat": quantizers})
    if strict and (
        report.foldable or report.redundant_biases or report.weight_problems or (stale is not None and stale.stale)
    ):
        return EXIT_FINDINGS
    return EXIT_OK


@main.command()
@MODEL_ARGUMENT
@output_option("MODEL.folded.keras beside MODEL")
@verify_options(REWRITE_CHECK)
@format_option()
@common_options
def fold(settings: Settings, checking: Checking, model: Path, output: Path | None, fmt: str) -> int:
    """Fold every BatchNormalization of MODEL that folds exactly into its neighbour.

    The folded model is compared with the original in memory and again as
    reloaded from the written file; nothing is written unless both agree.
    When nothing folds (no BN, or none that folds exactly), the model is
    unchanged: it says so and only the reloaded file is compared.
    Prints what was folded, what was not and why, parameters before and
    after, and the largest error.

    \b
    Example:
      kerasbn fold model.keras                      # writes model.folded.keras
      kerasbn fold model.h5 -o small.keras --inputs batch.npz --atol 1e-4
    """
    from kerasbn_cli import render

    output = output or model.with_name(f"{model.stem}.folded.keras")
    with render.progress(settings.quiet) as step:
        import kerasbn

        original, inputs = _load(settings, checking, model, output, step)
        step("Folding")
        result = kerasbn.fold(original)
        changed = bool(result.report.folded)
        # Nothing folded: what is written is the original, which needs no comparison with itself in memory.
        written = result.model if changed else original
        checks = _save_checked(settings, checking, written, output, step, inputs, original)
    render.print_rewrite(settings, "fold", result.report, checks, output, fmt, unchanged=not changed)
    return EXIT_OK


@main.command("strip-biases")
@MODEL_ARGUMENT
@output_option("MODEL.nobias.keras beside MODEL")
@verify_options(REWRITE_CHECK)
@common_options
def strip_biases(settings: Settings, checking: Checking, model: Path, output: Path | None) -> int:
    """Remove the Dense/Conv biases that a following BatchNormalization makes redundant.

    The training-time rewrite: each bias moves into the BN's moving mean, so
    outputs do not change and the model stays trainable. Verified like
    `fold`: in memory and as reloaded from the written file.

    \b
    Example:
      kerasbn strip-biases model.keras -o model.train.keras
    """
    from kerasbn_cli import render

    output = output or model.with_name(f"{model.stem}.nobias.keras")
    with render.progress(settings.quiet) as step:
        import kerasbn

        original, inputs = _load(settings, checking, model, output, step)
        step("Removing redundant biases")
        result = kerasbn.strip_redundant_biases(original)
        checks = _save_checked(settings, checking, result.model, output, step, inputs, original)
    render.print_strip(settings, result.report, checks, output)
    return EXIT_OK


@main.command()
@MODEL_ARGUMENT
@output_option("MODEL with .onnx, or .tflite with --to litert")
@export_to_option
@fold_option
@compare_unfolded_option
@opset_option
@dtype_option
@int8_option
@calibration_option
@min_agreement_option
@verify_options("Run the file in ONNX Runtime or LiteRT at batch 1 and --batch and compare with Keras.")
@format_option()
@common_options
def export(
    settings: Settings,
    checking: Checking,
    model: Path,
    output: Path | None,
    to: str | None,
    fold: bool,
    compare_unfolded: bool,
    opset: int | None,
    dtype: str | None,
    int8: bool,
    calibration: Path | None,
    min_agreement: float,
    fmt: str,
) -> int:
    """Export MODEL to ONNX or LiteRT with a dynamic batch dimension, BN folded away.

    Prints the op counts of the written graph (with --compare-unfolded, before
    and after the fold) and what the fold did. Nothing is written if ONNX
    Runtime (or the LiteRT interpreter) disagrees with Keras.

    With --int8 the verified float model is quantized with the --calibration
    rows (ONNX: ONNX Runtime's QDQ, per-channel weights; LiteRT: full-integer)
    and compared with the float model: top-1 agreement, errors, size and
    latency. Nothing is written if the agreement is below --min-agreement.

    A quantization-aware model (kerasbn qat) is written as int8 from its
    learned ranges, without --int8 or --calibration; nothing is written
    unless the file holds its trained integer weights and ranges and its
    outputs stay within 2 output steps of the simulated model (where
    rounding adds up past that: each layer within one step on the file's
    own inputs).

    \b
    Example:
      kerasbn export resnet.keras -o resnet.onnx --opset 17
      kerasbn export resnet.keras -o resnet.onnx --compare-unfolded
      kerasbn export deep.keras --atol 1e-4 --rtol 1e-3
      kerasbn export net.keras -o net.tflite
      kerasbn export mixed.keras -o net.fp16.onnx --dtype float16
      kerasbn export net.keras -o net.int8.tflite --int8 --calibration calib.npz --inputs test.npz
      kerasbn export net.qat.keras -o net.int8.onnx --inputs test.npz
    """
    from kerasbn_cli import render

    with render.progress(settings.quiet) as step:
        from kerasbn.deploy.target import target_for, targets
        from kerasbn.errors import KerasbnError

        if output is None:
            output = model.with_suffix(targets()[to].suffix if to in targets() else ".onnx")
        target = target_for(output, to)
        if int8 != (calibration is not None):
            raise KerasbnError(
                "--int8 needs --calibration DATA.npz (a quantization-aware model needs neither)"
                if int8
                else "--calibration goes with --int8"
            )
        if target.name == "onnx":
            quiet.import_frameworks("tf2onnx")  # its own start-up noise
        keras_model, inputs = _load(settings, checking, model, output, step)
        rows = None
        if int8:
            from kerasbn.deploy.files import load_inputs

            rows = load_inputs(calibration, keras_model)
        from kerasbn.deploy.export import export as export_model

        held_back = (
            quiet.converter_noise(settings.verbose) if target.name == "litert" or int8 else contextlib.nullcontext()
        )
        with held_back:
            result = export_model(
                keras_model,
                output,
                to=target.name,
                int8=rows,
                checks=checking.checks(inputs, export=True),
                fold=fold,
                compare_unfolded=compare_unfolded,
                dtype=dtype,
                opset=opset,
                min_agreement=min_agreement,
                inputs_label=checking.inputs_file.name if checking.inputs_file is not None else "inputs",
                overwrite=settings.force,
                on_step=step,
            )
    render.print_export(settings, result, fmt)
    return EXIT_OK


@main.command()
@MODEL_ARGUMENT
@data_options(required=True)
@mode_option
@output_option("MODEL.calibrated.keras beside MODEL")
@verify_options("Report how much the outputs moved, and check the reloaded file against the calibrated model.")
@format_option()
@common_options
def calibrate(
    settings: Settings,
    checking: Checking,
    model: Path,
    data: DataOptions,
    mode: str,
    output: Path | None,
    fmt: str,
) -> int:
    """Recompute the population statistics of every BN of MODEL from DATA (the paper's Algorithm 2).

    Each BN gets E[x] = E_B[μ_B] and Var[x] = m/(m−1)·E_B[σ²_B] over the
    mini-batches of DATA, computed in float64, instead of its moving
    averages. DATA is a .npy or .npz file (arrays named after the inputs) or
    a folder of images; it needs no labels, so calibrating on data of a new
    domain adapts the model to it (AdaBN). MODEL is never modified.

    \b
    Example:
      kerasbn calibrate model.keras --data train_sample.npz -o model.cal.keras
      kerasbn calibrate resnet.keras --data images/ --image-size 224 --mode paper
    """
    from kerasbn_cli import render

    output = output or model.with_name(f"{model.stem}.calibrated.keras")
    with render.progress(settings.quiet, bar=True) as progress:
        import kerasbn

        original, inputs = _load(settings, checking, model, output, progress.step)
        batches = _open_data(data, original)
        progress.step(f"Calibrating ({mode})")
        result = kerasbn.calibrate(original, batches, mode=mode, on_batch=progress.advance)
        moved = None
        if checking.verify:
            progress.step("Comparing the outputs")
            inputs = inputs if inputs is not None else batches.first(checking.batch)
            moved = checking.compare(original, result.model, inputs)
        # The file must reproduce the calibrated model (how far that moved from the original is `moved`).
        _save_checked(settings, checking, result.model, output, progress.step, inputs, result.model, "calibrated one")
    render.print_calibrate(settings, result.report, moved, output, fmt)
    return EXIT_OK


@main.command()
@MODEL_ARGUMENT
@swap_to_option
@unbiased_option
@output_option("MODEL.kerasbn.keras or MODEL.keras.keras beside MODEL")
@verify_options(REWRITE_CHECK)
@format_option()
@common_options
def swap(
    settings: Settings, checking: Checking, model: Path, to: str, unbiased: bool, output: Path | None, fmt: str
) -> int:
    """Replace every BatchNormalization of MODEL by the other implementation, weights and settings kept.

    Keras's layer becomes kerasbn.BatchNormalization (so keras.applications
    and keras-hub models train with the paper-exact layer), or back. Nested
    models included; a BN the target cannot represent stays and is listed.

    \b
    Example:
      kerasbn swap resnet.keras -o resnet.kerasbn.keras
      kerasbn swap trained.keras --to keras -o plain.keras
    """
    from kerasbn_cli import render

    output = output or model.with_name(f"{model.stem}.{to}.keras")
    with render.progress(settings.quiet) as step:
        import kerasbn

        original, inputs = _load(settings, checking, model, output, step)
        step("Swapping")
        result = kerasbn.swap(original, to=to, unbiased=unbiased)
        checks = _save_checked(settings, checking, result.model, output, step, inputs, original)
    render.print_rewrite(settings, "swap", result.report, checks, output, fmt)
    return EXIT_OK


@main.command("qat")
@MODEL_ARGUMENT
@output_option("MODEL.qat.keras beside MODEL")
@qat_calibration_option
@weight_bits_option
@per_tensor_option
@freeze_after_option
@verify_options(
    "Check that the QAT model without fake quant is the folded original, and that the reloaded file "
    "reproduces the QAT model exactly."
)
@format_option()
@common_options
def qat(
    settings: Settings,
    checking: Checking,
    model: Path,
    output: Path | None,
    calibration: Path | None,
    weight_bits: int,
    per_tensor: bool,
    freeze_after: int | None,
    fmt: str,
) -> int:
    """Prepare MODEL for quantization-aware training: BN folded into fake-quantized layers.

    Every Conv/Depthwise/Separable/Dense → BN pair that folds becomes one
    fused layer (batch statistics with the σ_B/σ correction until frozen);
    other Dense/Conv layers get weight fake-quant; 8-bit activation
    quantizers go where an int8 graph requantizes. Train the written model
    with fit (keras.saving.load_model, safe mode) and export it as int8.
    MODEL is never modified.

    \b
    Example:
      kerasbn qat model.keras -o model.qat.keras --calibration calib.npz
      kerasbn qat model.keras --weight-bits 4 --per-tensor --freeze-after 2000
    """
    from kerasbn_cli import render

    output = output or model.with_name(f"{model.stem}.qat.keras")
    with render.progress(settings.quiet) as step:
        import numpy as np

        import kerasbn
        from kerasbn.deploy.outputs import keras_outputs, random_inputs
        from kerasbn.errors import VerificationError
        from kerasbn.statistics.data import open_batches

        original, inputs = _load(settings, checking, model, output, step)
        batches = open_batches(calibration, original) if calibration is not None else None
        step("Preparing")
        prepared = kerasbn.qat.prepare(
            original,
            weight_bits=weight_bits,
            per_channel=not per_tensor,
            calibration=batches,
            freeze_after=freeze_after,
        )
        inputs = inputs if inputs is not None else random_inputs(original, checking.batch, seed=0)
        folded = None
        if checking.verify:
            step("Comparing the QAT model without fake quant with the original")
            folded = checking.compare(original, kerasbn.qat.convert(prepared), inputs)
            if not folded.passed:
                raise VerificationError(f"the QAT model's fold differs from the original: {folded}; nothing written")
        # The reloaded file must be this QAT model exactly (its fake quant runs in float32 only, so
        # there is no float64 twin to judge it by: same weights, same outputs, bit for bit).
        expected = keras_outputs(prepared, inputs) if checking.verify else []

        def check(reloaded: Any) -> None:
            got = keras_outputs(reloaded, inputs)
            if not all(np.array_equal(a, b) for a, b in zip(expected, got)):
                raise VerificationError("the reloaded QAT model differs from the prepared one; nothing written")

        step(f"Writing {output.name}")
        kerasbn.save_model(
            prepared,
            output,
            overwrite=settings.force,
            check=check if checking.verify else None,
            safe_mode=settings.safe_mode,
            custom_modules=settings.imports,
        )
    if not settings.quiet:
        report = kerasbn.qat.audit(prepared)
        preparation = prepared.qat_preparation
        if fmt == "json":
            render.print_json(
                {
                    "output": str(output),
                    "fused": [{"layer": a, "bn": b} for a, b in preparation.fused],
                    "weight_quantized": preparation.weight_quantized,
                    "float_layers": [vars(f) for f in preparation.float_layers],
                    "quantizers": report.to_dict()["quantizers"],
                    "verified": None if folded is None else folded.to_dict(),
                }
            )
        else:
            out = render.console()
            out.print(report)
            for f in preparation.float_layers:
                out.print(f"stays float: {f.layer}: {f.reason}")
            fused = len(preparation.fused)
            out.print(f"{fused} BN fused, {len(preparation.weight_quantized)} other layers weight-quantized.")
            out.print(f"Wrote {output}" + ("" if folded is not None else " (not verified: --no-verify)"))
    return EXIT_OK


def _open_data(data: DataOptions, model: Any) -> Any:
    """The mini-batches of --data for ``model`` (``None`` without --data); bad data fails here, before any work."""
    from kerasbn.statistics.data import open_batches

    if data.path is None:
        if data.required:
            from kerasbn.errors import KerasbnError

            raise KerasbnError("no data: give --data DATA (a .npy or .npz file, or a folder of images)")
        return None
    return open_batches(data.path, model, batch_size=data.batch_size, image_size=data.image_size)


def _load(settings: Settings, checking: Checking, model: Path, output: Path, step: Callable[[str], None]) -> tuple:
    """The model, and the verification inputs when --inputs names a file."""
    import kerasbn
    from kerasbn.deploy.files import load_inputs

    _check_distinct(settings, model, output)
    step(f"Loading {model.name}")
    original = kerasbn.load_model(model, safe_mode=settings.safe_mode, custom_modules=settings.imports)
    inputs = load_inputs(checking.inputs_file, original) if checking.inputs_file is not None else None
    return original, inputs


def _save_checked(
    settings: Settings,
    checking: Checking,
    model: Any,
    output: Path,
    step: Callable[[str], None],
    inputs: Any,
    reference: Any,
    reference_name: str = "original",
) -> dict[str, Any]:
    """Write ``model`` atomically, verified against ``reference``: nothing is written unless every check passes.

    ``model`` must compute what ``reference`` (the original of a rewrite) does in memory, and
    again as reloaded from the file; checked against itself (calibrate), only the reloaded
    file is. Returns the `kerasbn.VerifyResult` of each check by stage.
    """
    import kerasbn
    from kerasbn.errors import VerificationError

    checks = {}

    def compare(candidate: Any, stage: str) -> None:
        result = checking.compare(reference, candidate, inputs)
        checks[stage] = result
        if not result.passed:
            raise VerificationError(f"the {stage} model differs from the {reference_name}: {result}; nothing written")

    if checking.verify and reference is not model:
        step("Verifying in memory")
        compare(model, "rewritten")
    step(f"Writing {output.name}" + (" and verifying the reloaded file" if checking.verify else ""))
    kerasbn.save_model(
        model,
        output,
        overwrite=settings.force,
        check=(lambda reloaded: compare(reloaded, "reloaded")) if checking.verify else None,
        safe_mode=settings.safe_mode,
        custom_modules=settings.imports,
    )
    return checks


def _check_distinct(settings: Settings, model: Path, output: Path) -> None:
    """Refuse a bad output before the long work; the input is never modified, even with --force."""
    from kerasbn.deploy.files import check_output_path
    from kerasbn.errors import KerasbnError

    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise KerasbnError(f"{output}: is the input model; choose another output file")
    if model.exists():
        check_output_path(output, settings.force)
