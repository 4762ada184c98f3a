"""`kerasbn.export`: one pipeline for every file format, float and int8.

    signature → fold → convert → graph passes → (int8) → run in the target's runtime → compare → atomic write

A format is a `kerasbn.deploy.target.Target` (ONNX and LiteRT are two); int8
is a step of the same pipeline for either. The model's signature is worked out
once (`kerasbn.model_signature`), the original model's outputs on the check inputs
are evaluated once (`kerasbn.deploy.verify.Reference`), and the written file
is judged against them in its own runtime before it is renamed into place, so
a bad fold, conversion or graph pass never reaches the output path. When the
check fails after graph passes, the passes are replayed one by one to name
the one that changed the outputs.

A quantized model cannot match the float one to float tolerances, so it is
judged differently: on the calibration rows (and the user's inputs) the top-1
class of every classification output must agree with the float Keras model on
at least ``min_agreement`` of the rows (`kerasbn.deploy.quantize`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kerasbn.deploy import twins
from kerasbn.deploy.files import atomic_output, check_output_path
from kerasbn.deploy.quantize import DEFAULT_MIN_AGREEMENT, int8_report
from kerasbn.deploy.reports import Int8Report
from kerasbn.deploy.target import Target, target_for, targets
from kerasbn.deploy.verify import Checks, Reference, VerifyResult
from kerasbn.errors import KerasbnError, UnsupportedModelError, VerificationError, first_line
from kerasbn.folding.model_checks import check_weights
from kerasbn.model_signature import Signature, signature
from kerasbn.printable import Printable, Table

# The float types a file can compute in; int8 is its own step.
PRECISIONS = ("float32", "float16")


@dataclass(frozen=True)
class ExportResult(Printable):
    """What `export` wrote and how it checked it.

    Attributes:
        path: The file (written only when every check passed).
        opset: The format version of the graph (ONNX opset, LiteRT schema).
        op_counts: Op type → count in the written graph.
        op_counts_unfolded: The same for the model converted without folding
            (with ``compare_unfolded``; else None): the "before" column of the table.
        fold_report: The fold engine's report, or None with ``fold=False``.
        checks: One `VerifyResult` per input case (empty without verification).
        size: Bytes of the written file.
        size_unfolded: Bytes of the unfolded model's file (with ``op_counts_unfolded``).
        passes: The graph passes that changed the graph, in order.
        format: The target's name (``"onnx"``, ``"litert"``).
        dtype: The float type the file computes in (``"float32"`` or ``"float16"``).
        model_dtype: The float type the Keras model computes in (``"float16"`` for
            ``mixed_float16``); a float32 file of a mixed-precision model holds the
            same weights computed in float32.
    """

    path: Path
    opset: int
    op_counts: dict[str, int]
    op_counts_unfolded: dict[str, int] | None = None
    fold_report: Any = None
    checks: tuple[VerifyResult, ...] = field(default_factory=tuple)
    size: int = 0
    size_unfolded: int | None = None
    passes: tuple[str, ...] = ()
    format: str = "onnx"
    dtype: str = "float32"
    model_dtype: str = "float32"

    @property
    def target(self) -> Target:
        return targets()[self.format]

    @property
    def runtime(self) -> str:
        """The runtime that checked the file."""
        return self.target.runtime

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def op_table(self) -> list[tuple[str, int | None, int]]:
        """Rows (op type, count before fold or None, count after), onnx-simplifier style."""
        before = self.op_counts_unfolded
        ops = sorted(set(before or {}) | set(self.op_counts))
        return [(op, None if before is None else before.get(op, 0), self.op_counts.get(op, 0)) for op in ops]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``kerasbn export --format json``)."""
        return {
            "format": self.format,
            "path": str(self.path),
            "opset": self.opset,
            "op_counts": dict(self.op_counts),
            "op_counts_unfolded": None if self.op_counts_unfolded is None else dict(self.op_counts_unfolded),
            "fold": None if self.fold_report is None else self.fold_report.to_dict(),
            "verified": self.verified,
            "checks": [c.to_dict() for c in self.checks],
            "size": self.size,
            "size_unfolded": self.size_unfolded,
            "passes": list(self.passes),
            "dtype": self.dtype,
            "model_dtype": self.model_dtype,
        }

    def view(self) -> list[Table | str]:
        """The op table (before and after the fold, with ``op_counts_unfolded``), its totals and file sizes."""
        from kerasbn.report import file_size

        before = self.op_counts_unfolded
        rows: list[tuple[str, ...]] = []
        for op, n_before, n_after in self.op_table():
            if before is None:
                rows.append((op, str(n_after)))
            elif n_before == n_after:
                rows.append((op, str(n_before), str(n_after)))
            else:
                rows.append((op, str(n_before), f"{n_after} ({n_after - n_before:+d})"))
        if before is None:
            rows.append(("Model size", file_size(self.size)))
            headers: tuple[str, ...] = ("Op", "Count")
        else:
            rows.append(("Total", str(sum(before.values())), str(sum(self.op_counts.values()))))
            rows.append(("Model size", file_size(self.size_unfolded), file_size(self.size)))
            headers = ("Op", "Before fold", "After fold")
        title = self.target.describe(self.path.name, self.opset)
        return [Table(title=title, headers=headers, rows=rows, numeric=range(1, 3), title_justify="left")]


class ExportVerificationError(VerificationError):
    """The target's runtime disagrees with Keras; `result` holds the numbers (nothing was written)."""

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


def export(
    model: Any,
    path: str | os.PathLike,
    *,
    to: str | None = None,
    int8: Any = None,
    checks: Checks | None = None,
    fold: bool = True,
    optimize: bool = True,
    compare_unfolded: bool = False,
    dtype: str | None = None,
    opset: int | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    inputs_label: str = "inputs",
    overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult | Int8Report | Any:
    """Fold BatchNormalization away, convert, check the file in its own runtime, and write it atomically.

    A quantization-aware model (`kerasbn.qat.prepare`) is written as int8 from
    its learned grids and ranges, with no calibration data, and checked
    against its own simulated outputs (`kerasbn.deploy.qat_int8.export_qat`,
    which returns a `kerasbn.deploy.qat_int8.QatExportResult`); `fold` and
    `compare_unfolded` do not apply to it.

    Args:
        model: A `keras.Model` of any kind (functional, Sequential, nested,
            subclassed and called once) on the TensorFlow backend.
        path: The file to write; its suffix names the format (``.onnx``, ``.tflite``) unless `to` does.
        to: The format: ``"onnx"`` or ``"litert"``.
        int8: Calibration inputs (in the structure the model takes, a few
            hundred representative rows) for a static int8 file; None writes float.
        checks: How the file is checked against Keras (`kerasbn.deploy.verify.Checks`):
            random inputs at batch 1 and 8 by default, calibrated to the model's own noise.
        fold: Run `kerasbn.fold` first, so no BatchNormalization, and no
            per-channel arithmetic left over from one, reaches the graph.
        optimize: Run the target's graph passes (ONNX: `kerasbn.deploy.onnx_passes`).
        compare_unfolded: Also convert the unfolded model, for the op table's
            "Before fold" column: a second conversion, so off by default (an
            export costs one conversion plus its checks).
        dtype: The float type of the file: ``"float32"`` (default, also for a
            mixed-precision model: its weights computed in float32) or
            ``"float16"`` (ONNX: float16 weights and arithmetic; LiteRT: float16
            weights), judged against Keras with float16's rounding.
        opset: The ONNX opset (ONNX only); tf2onnx's default when None.
        min_agreement: With `int8`: the top-1 agreement with the float Keras
            model each classification output must reach on every input set.
        inputs_label: The name of ``checks.inputs`` in the int8 report (e.g. its file name).
        overwrite: Replace an existing `path`.
        on_step: Called with a short description before each long step.

    Returns:
        An `ExportResult`, with `int8` an `kerasbn.deploy.reports.Int8Report`, for a
        quantization-aware model a `kerasbn.deploy.qat_int8.QatExportResult`.

    Raises:
        ExportVerificationError: The runtime disagrees with Keras; nothing is written.
        kerasbn.deploy.quantize.QuantizationError: The int8 file falls short of `min_agreement`.
        kerasbn.deploy.qat_int8.QatVerificationError: The int8 file of a quantization-aware model is not that model.
        kerasbn.errors.UnsupportedModelError: The model cannot be traced, converted or quantized.
        kerasbn.errors.KerasbnError: Bad options or data, the output path is not writable or exists, or a
            weight holds NaN or infinite values or a negative BN variance (`kerasbn.folding.model_checks`).

    Examples:
        >>> import keras, kerasbn, tempfile, pathlib
        >>> x = keras.Input((4,))
        >>> model = keras.Model(x, keras.layers.BatchNormalization()(keras.layers.Dense(3)(x)))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.onnx"
        >>> result = kerasbn.export(model, path)
        >>> result.verified, result.op_counts.get("BatchNormalization", 0)
        (True, 0)
    """
    check_weights(model)
    step = on_step or (lambda _message: None)
    if _quantization_aware(model):
        if compare_unfolded:
            raise KerasbnError("compare_unfolded does not apply to a quantization-aware model: it has no BN to fold")
        return _export_quantization_aware(model, path, to, int8, dtype, checks, opset, optimize, overwrite, step)
    path = Path(path)
    options = ExportOptions(
        target=target_for(path, to),
        dtype=dtype or "float32",
        opset=opset,
        int8=int8 is not None,
        min_agreement=min_agreement,
        fold=fold,
        optimize=optimize,
        compare_unfolded=compare_unfolded,
    )
    check_output_path(path, overwrite)
    checks = checks or Checks()
    sig = signature(model)
    if checks.inputs is not None:
        checks = replace(checks, inputs=sig.pack(sig.conform(checks.inputs, inputs_label)))
    rows = None if int8 is None else sig.conform(int8, "calibration data")

    reference = Reference(model, checks, options.dtype) if checks.verify else None
    conversion, result, content = _float_file(model, sig, path, options, step)
    if rows is None:
        with atomic_output(path, overwrite=overwrite) as tmp:
            tmp.write_bytes(content)
            return _checked(conversion, reference, result, tmp, step)
    sets = [("calibration", rows)]
    if checks.inputs is not None:
        sets.append((inputs_label, sig.flatten(checks.inputs)))
    report, quantized = _int8_file(model, conversion, reference, result, content, sets, step)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(quantized)
    return report


@dataclass(frozen=True)
class ExportOptions:
    """How `export` makes a file, validated once (the checks are `kerasbn.deploy.verify.Checks`).

    Attributes:
        target: The format (`kerasbn.deploy.target.Target`); it must run on this Keras backend.
        dtype: The float type of the file (one of `PRECISIONS`).
        opset: The ONNX opset, or ``None`` for the converter's default (ONNX only).
        int8: Quantize the float32 file to int8 afterwards.
        min_agreement: With ``int8``: the top-1 agreement each set must reach, in [0, 1].
        fold: Fold BatchNormalization first.
        optimize: Run the target's graph passes.
        compare_unfolded: Also convert the unfolded model (the op table's "before" column).

    Raises:
        kerasbn.errors.KerasbnError: An option does not apply to the target, or is out of range.
        kerasbn.errors.UnsupportedModelError: The target does not run on this Keras backend.
    """

    target: Target
    dtype: str = "float32"
    opset: int | None = None
    int8: bool = False
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    fold: bool = True
    optimize: bool = True
    compare_unfolded: bool = False

    def __post_init__(self) -> None:
        self.target.check_backend()
        if self.opset is not None and "opset" not in self.target.options:
            raise KerasbnError(f"opset applies to ONNX only, not {self.target.title}")
        if self.dtype not in PRECISIONS:
            raise KerasbnError(f"dtype must be one of {', '.join(PRECISIONS)}, not {self.dtype!r}")
        if self.int8 and self.dtype != "float32":
            raise KerasbnError(f"dtype {self.dtype} and int8 exclude each other: int8 quantizes the float32 file")
        if self.int8 and not 0.0 <= self.min_agreement <= 1.0:
            raise KerasbnError(f"min_agreement must be between 0 and 1, not {self.min_agreement}")

    @property
    def converter(self) -> dict[str, Any]:
        """The keyword arguments of `kerasbn.deploy.target.Target.convert`."""
        return {"dtype": self.dtype, **({} if self.opset is None else {"opset": self.opset})}


@dataclass(frozen=True)
class Conversion:
    """How the checked graph was made: what `_blame_pass` replays when the check fails.

    Attributes:
        sig: The model's signature.
        model: The converted model (folded, computing in float32).
        options: The export's options (the target, its converter's keywords, whether passes ran).
    """

    sig: Signature
    model: Any
    options: ExportOptions

    @property
    def target(self) -> Target:
        return self.options.target


def _float_file(
    model: Any, sig: Signature, path: Path, options: ExportOptions, step: Callable[[str], None]
) -> tuple[Conversion, ExportResult, bytes]:
    """Fold, convert and run the graph passes: the float file's bytes, unchecked, and how they were made."""
    target = options.target
    subject, fold_report = model, None
    if options.fold:
        from kerasbn.folding.fold import fold as fold_model

        step("Folding BatchNormalization")
        folded = fold_model(model)
        subject, fold_report = folded.model, folded.report
    model_dtype = twins.compute_dtype(model)
    subject = _in_float32(subject)
    before = size_before = None
    if options.fold and options.compare_unfolded:
        step("Converting the unfolded model (for the op table)")
        unfolded = target.convert(_in_float32(model), sig, **options.converter)
        before, size_before = target.op_counts(unfolded), len(target.serialize(unfolded))
        del unfolded
    step(f"Converting to {target.title}")
    graph, passes = _passes(target, target.convert(subject, sig, **options.converter), options.optimize, step)
    content = target.serialize(graph)
    result = ExportResult(
        path=path,
        opset=target.version(graph),
        op_counts=target.op_counts(graph),
        op_counts_unfolded=before,
        fold_report=fold_report,
        size=len(content),
        size_unfolded=size_before,
        passes=passes,
        format=target.name,
        dtype=options.dtype,
        model_dtype=model_dtype,
    )
    return Conversion(sig=sig, model=subject, options=options), result, content


def _int8_file(
    model: Any,
    conversion: Conversion,
    reference: Reference | None,
    result: ExportResult,
    content: bytes,
    sets: list[tuple[str, Any]],
    step: Callable[[str], None],
) -> tuple[Int8Report, bytes]:
    """The float file checked, then quantized with the calibration rows (``sets[0]``) and judged by agreement."""
    target, sig = conversion.target, conversion.sig
    with tempfile.TemporaryDirectory(prefix="kerasbn-int8-") as folder:
        float_path = Path(folder) / f"float32{target.suffix}"
        float_path.write_bytes(content)
        float_export = _checked(conversion, reference, replace(result, path=float_path), float_path, step)
        step(f"Quantizing to int8 for {target.runtime}")
        quantized = target.serialize(target.quantize(conversion.model, sig, float_path, sets[0][1]))
        step("Comparing the int8 model with the float model")
        report = target.guarded(
            lambda: int8_report(
                model,
                sig,
                float_export=float_export,
                quantized=quantized,
                sets=sets,
                path=result.path,
                min_agreement=conversion.options.min_agreement,
            ),
        )
    return report, quantized


def _quantization_aware(model: Any) -> bool:
    from kerasbn.ops.fake_quant import is_quantization_aware

    return hasattr(model, "_flatten_layers") and is_quantization_aware(model)


def _export_quantization_aware(
    model: Any,
    path: Any,
    to: Any,
    int8: Any,
    dtype: Any,
    checks: Any,
    opset: Any,
    optimize: bool,
    overwrite: bool,
    step: Any,
) -> Any:
    """A quantization-aware model is its own int8 model: `kerasbn.deploy.qat_int8.export_qat`, no calibration."""
    from kerasbn.deploy.qat_int8 import export_qat

    if int8 is not None:
        raise KerasbnError(
            "a quantization-aware model exports as int8 from its learned ranges: give no calibration data"
        )
    if dtype not in (None, "float32"):
        raise KerasbnError(
            f"a quantization-aware model exports as int8, not {dtype}: kerasbn.qat.convert(model) gives its float model"
        )
    return export_qat(
        model, path, to=to, checks=checks, opset=opset, optimize=optimize, overwrite=overwrite, on_step=step
    )


def _in_float32(model: Any) -> Any:
    """``model`` computing in float32: itself, or for a mixed-precision model its float32 twin (the same weights).

    Converters write what the model computes; a float16 or bfloat16 graph is
    not what ONNX Runtime or LiteRT's builtin kernels run on a CPU.
    """
    if twins.compute_dtype(model) == "float32":
        return model
    try:
        return twins.twin(model, "float32")
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            f"'{model.name}' computes in {twins.compute_dtype(model)} and has no float32 copy to convert: {exc}"
        ) from exc


def _passes(target: Target, graph: Any, optimize: bool, step: Callable[[str], None]) -> tuple[Any, tuple[str, ...]]:
    """The target's graph passes on `graph`; the names of those that changed its op counts."""
    steps = target.passes() if optimize else ()
    if steps:
        step(f"Graph passes: {', '.join(name for name, _ in steps)}")
    changed = []
    for name, transform in steps:
        before = target.op_counts(graph)
        try:
            graph = transform(graph)
        except Exception as exc:  # the optimizers raise whatever their internals do
            raise UnsupportedModelError(f"{target.title} pass '{name}' failed: {first_line(exc)}") from exc
        if target.op_counts(graph) != before:
            changed.append(name)
    return graph, tuple(changed)


def _checked(
    conversion: Conversion, reference: Reference | None, result: ExportResult, file: Path, step: Callable[[str], None]
) -> ExportResult:
    """`result` with the checks of `file` in the target's runtime; raises if they fail (nothing is written then)."""
    if reference is None:
        return result
    target, sig = conversion.target, conversion.sig
    step(f"Checking with {target.runtime}")
    result = replace(result, checks=target.guarded(lambda: reference.judge(target.runner(file, sig))))
    failed = [c for c in result.checks if not c.passed]
    if not failed:
        return result
    if result.passes:
        _blame_pass(conversion, reference)
    worst = max(failed, key=lambda c: c.max_abs_error)
    runtime = "the LiteRT interpreter" if target.runtime == "LiteRT" else target.runtime
    raise ExportVerificationError(
        f"{runtime} disagrees with Keras at batch size {worst.batch_size}: max |error| "
        f"{worst.max_abs_error:.3g} exceeds {worst.tolerance}; nothing written",
        result,
    )


def _blame_pass(conversion: Conversion, reference: Reference) -> None:
    """Replay the conversion and the passes, checking each graph, and raise naming the first pass that broke it.

    Returns without raising when the graph before any pass already disagrees
    (the fold or the conversion is to blame, not a pass).
    """
    target, sig = conversion.target, conversion.sig
    graph = target.convert(conversion.model, sig, **conversion.options.converter)
    previous = reference.judge(target.runner(target.serialize(graph), sig))
    if not all(c.passed for c in previous):
        return
    for name, transform in target.passes() if conversion.options.optimize else ():
        graph = transform(graph)
        now = reference.judge(target.runner(target.serialize(graph), sig))
        failed = [c for c in now if not c.passed]
        if failed:
            worst = max(failed, key=lambda c: c.max_abs_error)
            raise VerificationError(
                f"{target.title} pass '{name}' changed the outputs: max |error| {worst.max_abs_error:.3g} "
                f"exceeds {worst.tolerance}; nothing written"
            )


def _legacy(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the 0.1 exporters, with their check options as one `Checks`."""
    fields = ("verify", "batch_sizes", "inputs", "atol", "rtol", "seed")
    given = {k: options.pop(k) for k in fields if k in options}
    return {**options, "checks": Checks(**given)}


def export_onnx(model: Any, path: str | os.PathLike, **options: Any) -> ExportResult:
    """`export` to ONNX; the 0.1 name, kept so code using it works (check options as keywords)."""
    return export(model, path, to="onnx", **_legacy(options))


def export_litert(model: Any, path: str | os.PathLike, **options: Any) -> ExportResult:
    """`export` to LiteRT; the 0.1 name, kept so code using it works (check options as keywords)."""
    return export(model, path, to="litert", **_legacy(options))


def export_int8(model: Any, path: str | os.PathLike, calibration: Any, **options: Any) -> Int8Report:
    """`export` with ``int8=calibration``; the 0.1 name, kept so code using it works."""
    return export(model, path, int8=calibration, **_legacy(options))
