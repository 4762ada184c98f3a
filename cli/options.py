"""Options shared by every command, defined once, and the one place that maps
outcomes to exit codes.

Exit codes (as black reports them): 0 success; 1 a verification failed or
`--strict` found something; 2 bad usage, or an input that cannot be read or is
not supported. Errors are one line on stderr; tracebacks only with `-v`.
"""

from __future__ import annotations

import functools
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2


@dataclass(frozen=True)
class Settings:
    """The common options of one invocation."""

    imports: tuple[str, ...]
    unsafe: bool
    quiet: bool
    verbose: bool
    force: bool

    @property
    def safe_mode(self) -> bool:
        return not self.unsafe


_COMMON = (
    click.option(
        "--import",
        "imports",
        multiple=True,
        metavar="MODULE",
        help="Import MODULE first (repeatable); it registers the custom layers the model uses.",
    ),
    click.option(
        "--unsafe",
        is_flag=True,
        help="Let Keras deserialize Python lambdas. This runs code from the file: trusted files only.",
    ),
    click.option("-q", "--quiet", is_flag=True, help="Print only errors."),
    click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for unexpected errors."),
    click.option("--force", is_flag=True, help="Overwrite an existing output file."),
)

# Each option of a command, defined once (as pip-tools' options.py does); main.py stacks them.
MODEL_ARGUMENT = click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))


def output_option(default_help: str) -> Callable:
    """``-o/--output``; ``default_help`` says where the command writes without it."""
    return click.option(
        "-o",
        "--output",
        type=click.Path(path_type=Path),
        metavar="OUT",
        help=f"Output file [default: {default_help}].",
    )


def format_option(*formats: str) -> Callable:
    """``--format``, received as ``fmt``: ``table`` (the default), ``json``, and ``formats`` beyond them."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "json", *formats]),
        default="table",
        show_default=True,
        help="Output format.",
    )


strict_option = click.option(
    "--strict", is_flag=True, help="Exit with status 1 if a BN folds, a bias is redundant or (with --data) is stale."
)
quantization_option = click.option(
    "--quantization",
    is_flag=True,
    help="Also show how each fold spreads the per-channel weight ranges (per-tensor vs per-channel int8).",
)

# export
export_to_option = click.option(
    "--to",
    metavar="FORMAT",
    # Not a click.Choice: the formats are the library's registry (kerasbn.deploy.target.REGISTRY),
    # which `--help` must not import.
    help="File format: onnx or litert (TFLite) [default: from OUT's suffix, .onnx or .tflite].",
)
fold_option = click.option(
    "--fold/--no-fold", default=True, show_default=True, help="Fold BatchNormalization before converting."
)
compare_unfolded_option = click.option(
    "--compare-unfolded",
    is_flag=True,
    help="Also convert the unfolded model, for a 'Before fold' column in the op table (a second conversion).",
)
# Which formats take an opset is the library's to say (kerasbn.export): one check, one message.
opset_option = click.option("--opset", type=click.IntRange(min=7), metavar="N", help="ONNX opset [default: tf2onnx's].")
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    help="Float type of the file [default: float32, also for a mixed-precision model: its weights computed in "
    "float32]. float16: ONNX computes in float16, LiteRT stores float16 weights; checked with float16's rounding.",
)
int8_option = click.option(
    "--int8", is_flag=True, help="Quantize to int8 after the fold (static, calibrated on --calibration)."
)
calibration_option = click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    metavar="DATA.npz",
    help="Representative inputs for --int8 (arrays named after the model inputs), a few hundred rows.",
)
min_agreement_option = click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1),
    default=0.99,
    show_default=True,
    help="With --int8: the top-1 agreement with the float model required on the calibration rows and --inputs.",
)

# calibrate
mode_option = click.option(
    "--mode",
    type=click.Choice(["sequential", "paper"]),
    default="sequential",
    show_default=True,
    help="sequential: each BN with the earlier ones already calibrated (one pass per BN); "
    "paper: Algorithm 2 as written, every BN on its batch statistics (one pass).",
)

# qat
qat_calibration_option = click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    metavar="DATA",
    help="Set the activation ranges from DATA (a .npy or .npz file named after the inputs, or a folder of "
    "images), so training starts from the post-training-quantized model [default: the first training batch].",
)
weight_bits_option = click.option(
    "--weight-bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Bits of the weight grids."
)
per_tensor_option = click.option(
    "--per-tensor", is_flag=True, help="One weight scale per tensor (default: per output channel)."
)
freeze_after_option = click.option(
    "--freeze-after",
    type=click.IntRange(min=0),
    metavar="STEPS",
    help="Freeze the BN statistics after STEPS training steps [default: when training calls kerasbn.qat.freeze].",
)

# swap
swap_to_option = click.option(
    "--to",
    type=click.Choice(["kerasbn", "keras"]),
    default="kerasbn",
    show_default=True,
    help="The BatchNormalization every BN becomes.",
)
unbiased_option = click.option(
    "--unbiased",
    is_flag=True,
    help="With --to kerasbn: track the paper's unbiased moving variance (default: Keras's biased one, as before).",
)


@dataclass(frozen=True)
class Checking:
    """How the rewrite commands compare the new model with the original."""

    verify: bool
    atol: float | None
    rtol: float | None
    batch: int
    inputs_file: Path | None

    def compare(self, reference: Any, candidate: Any, inputs: Any = None) -> Any:
        """`kerasbn.verify` of ``candidate`` against ``reference`` with these flags (random inputs at ``--batch``)."""
        import kerasbn

        return kerasbn.verify(reference, candidate, inputs, batch_size=self.batch, atol=self.atol, rtol=self.rtol)

    def checks(self, inputs: Any = None, *, export: bool = False) -> Any:
        """The library's `kerasbn.deploy.verify.Checks` for these flags (``inputs``: the loaded ``--inputs``).

        An export is checked at batch 1 and ``--batch`` (a dynamic batch axis);
        a rewritten Keras model at ``--batch``.
        """
        from kerasbn.deploy.verify import Checks

        batch_sizes = sorted({1, self.batch}) if export else [self.batch]
        return Checks(verify=self.verify, batch_sizes=tuple(batch_sizes), inputs=inputs, atol=self.atol, rtol=self.rtol)


def verify_options(verify_help: str) -> Callable[[Callable], Callable]:
    """Options of the commands that check their result; the command receives them as `checking`."""
    return functools.partial(_add_verify_options, verify_help=verify_help)


def _add_verify_options(fn: Callable, verify_help: str) -> Callable:

    @functools.wraps(fn)
    def command(
        *, verify: bool, atol: float | None, rtol: float | None, batch: int, inputs_file: Path | None, **kwargs: Any
    ):
        checking = Checking(verify=verify, atol=atol, rtol=rtol, batch=batch, inputs_file=inputs_file)
        return fn(checking=checking, **kwargs)

    options = (
        click.option(
            "--verify/--no-verify",
            default=True,
            show_default=True,
            help=verify_help,
        ),
        # None means the library's default check (kerasbn.deploy.tolerances):
        # reading it here would import the library for `--help`.
        click.option(
            "--atol",
            type=click.FloatRange(min=0),
            default=None,
            help="Check element-wise |Δ| ≤ atol + rtol·|y| with this absolute tolerance (rtol then takes "
            "the library's default). Without --atol/--rtol the check is scale-aware: max|Δ|/max|y| per output "
            "within a few times the original model's own float32 noise (kerasbn.deploy.tolerances).",
        ),
        click.option(
            "--rtol",
            type=click.FloatRange(min=0),
            default=None,
            help="Check element-wise with this relative tolerance (atol then takes the library's default).",
        ),
        click.option(
            "--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Batch size of the random inputs."
        ),
        click.option(
            "--inputs",
            "inputs_file",
            type=click.Path(path_type=Path),
            metavar="FILE.npz",
            help="Verify on these arrays (named after the model inputs) instead of random ones.",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


@dataclass(frozen=True)
class DataOptions:
    """Where the data for BN statistics comes from (``--data`` and how to batch it)."""

    path: Path | None
    batch_size: int
    image_size: tuple[int, int] | None
    required: bool


def _image_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise click.BadParameter("give HEIGHTxWIDTH or one size for both, e.g. 224x160 or 96")
    return (size[0], size[-1])


def data_options(required: bool) -> Callable[[Callable], Callable]:
    """``--data``, ``--batch-size`` and ``--image-size``; the command receives them as ``data``.

    ``--data`` is checked by the command, after the model has loaded, so a
    bad model file is reported as such whatever else is missing.
    """
    return functools.partial(_add_data_options, required=required)


def _add_data_options(fn: Callable, required: bool) -> Callable:

    @functools.wraps(fn)
    def command(*, data_path: Path | None, batch_size: int, image_size: tuple[int, int] | None, **kwargs: Any):
        return fn(data=DataOptions(data_path, batch_size, image_size, required), **kwargs)

    what = "Data to compute" if required else "Also compare the stored BN statistics with those of"
    options = (
        click.option(
            "--data",
            "data_path",
            type=click.Path(path_type=Path),
            metavar="DATA",
            help=f"{what} the population statistics from: a .npy or .npz file (arrays named after the "
            "model inputs) or a folder of images." + (" Required." if required else ""),
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Samples per mini-batch of DATA (the paper's m is this times the spatial positions).",
        ),
        click.option(
            "--image-size",
            callback=_image_size,
            metavar="HxW",
            help="Resize images of a DATA folder to this [default: the model's input size].",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def common_options(fn: Callable) -> Callable:
    """Add the shared options; the command receives them as `settings` and runs guarded."""

    @functools.wraps(fn)
    def command(*, imports: tuple[str, ...], unsafe: bool, quiet: bool, verbose: bool, force: bool, **kwargs: Any):
        settings = Settings(imports=tuple(imports), unsafe=unsafe, quiet=quiet, verbose=verbose, force=force)
        return run_guarded(settings, lambda: fn(settings=settings, **kwargs))

    for option in reversed(_COMMON):
        command = option(command)
    return command


def run_guarded(settings: Settings, body: Callable[[], int | None]) -> None:
    """Run a command body and turn its outcome into an exit code and one line."""
    from kerasbn_cli.quiet import import_frameworks

    # First, before `kerasbn` (which imports Keras) is imported anywhere.
    import_frameworks()
    from kerasbn.errors import KerasbnError, VerificationError, first_line

    try:
        with warnings.catch_warnings():
            # NumPy's "invalid value encountered in sqrt" and the like: what a computation got wrong is
            # reported by the check that compares its result, in one line.
            warnings.simplefilter("ignore", RuntimeWarning)
            code = body() or EXIT_OK
    except (click.exceptions.Exit, click.ClickException):
        raise
    except VerificationError as exc:
        _error(str(exc))
        code = EXIT_FINDINGS
    except KerasbnError as exc:
        _error(str(exc))
        code = EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted")
        code = 130
    except Exception as exc:  # the last guard: a bug must still end in one line
        if settings.verbose:
            traceback.print_exc()
        hint = "" if settings.verbose else " (rerun with -v for the traceback)"
        _error(f"unexpected {type(exc).__name__}: {first_line(exc)}{hint}")
        code = EXIT_ERROR
    sys.stdout.flush()
    raise click.exceptions.Exit(code)


def _error(message: str) -> None:
    one_line = " ".join(message.split())
    click.echo(f"kerasbn: error: {one_line}", err=True)
