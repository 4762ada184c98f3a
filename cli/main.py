"""The `kerasbn` command group.

Only click is imported at module level: `kerasbn --help` and `--version` must
not pay for importing TensorFlow. Each command parses, calls the library,
prints and returns an exit code; the library does the work.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import click

from kerasbn_cli.options import (
    MODEL_ARGUMENT,
    Settings,
    common_options,
    output_option,
)

# Before TensorFlow is first imported (inside the commands): its C++ log noise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
@output_option("MODEL with .onnx")
@click.option("--fold/--no-fold", default=True, show_default=True, help="Fold BatchNormalization before converting.")
@click.option("--opset", type=click.IntRange(min=7), metavar="N", help="ONNX opset [default: tf2onnx's].")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Run the file in ONNX Runtime at two batch sizes and compare with Keras (rtol 1e-4, atol 1e-5).",
)
@common_options
def export(
    settings: Settings, model: Path, output: Path | None, fold: bool, opset: int | None, verify: bool
) -> int:
    """Export MODEL to ONNX with a dynamic batch dimension, BN folded away.

    Prints the op counts before and after the fold. Nothing is written if
    ONNX Runtime disagrees with Keras.

    \b
    Example:
      kerasbn export resnet.keras -o resnet.onnx --opset 17
    """
    from kerasbn_cli import render

    output = output or model.with_suffix(".onnx")
    with render.progress(settings.quiet) as step:
        from kerasbn.export import export_onnx
        from kerasbn.io import load_model

        _check_distinct(model, output)
        step(f"Loading {model.name}")
        keras_model = load_model(model, safe_mode=settings.safe_mode, custom_modules=settings.imports)
        result = export_onnx(keras_model, output, opset=opset, fold=fold, verify=verify, overwrite=settings.force, on_step=step)
    render.print_export(settings, result)
    return 0


def _check_distinct(model: Path, output: Path) -> None:
    """The input is never modified, not even with --force."""
    from kerasbn.errors import KerasbnError

    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise KerasbnError(f"{output}: is the input model; choose another output file")
