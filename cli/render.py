"""Printing: the library's reports (`kerasbn.printable`) on the console, plain text
when piped, JSON for machines; a progress spinner only on a terminal.

rich is imported inside the functions so `kerasbn --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any


def console() -> Any:
    from rich.console import Console

    # soft_wrap keeps long lines (paths) whole when output is piped into a file.
    return Console(soft_wrap=not sys.stdout.isatty(), highlight=False)


class Progress:
    """What a command reports while it works: ``progress(message)`` (or ``.step``) names
    the current step, ``.advance(done, total)`` moves the bar of a step over mini-batches."""

    def __init__(
        self, step: Callable[[str], None] = lambda _m: None, advance: Callable[[int, int], None] | None = None
    ):
        self.step = step
        self.advance = advance or (lambda _done, _total: None)

    def __call__(self, message: str) -> None:
        self.step(message)


@contextlib.contextmanager
def progress(quiet: bool, *, bar: bool = False) -> Iterator[Progress]:
    """Yield a `Progress`; a spinner (with ``bar``, also a progress bar) on stderr only on terminals."""
    if quiet or not (sys.stdout.isatty() and sys.stderr.isatty()):
        yield Progress()
        return
    from rich.console import Console

    if not bar:
        with Console(stderr=True).status("Starting") as status:
            yield Progress(lambda message: status.update(f"{message}…"))
        return
    from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Bar(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True) as live:
        task = live.add_task("Starting", total=None)

        def step(message: str) -> None:
            live.update(task, description=f"{message}…", total=None, completed=0)

        def advance(done: int, total: int) -> None:
            live.update(task, total=total, completed=done)

        yield Progress(step, advance)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def error(value: float) -> str:
    return f"{value:.2e}"


def print_export(settings: Any, result: Any, fmt: str) -> None:
    """What kerasbn.export wrote (or the record as JSON), then the path.

    A float export: its op table and the runtime's checks; int8: the float
    export it was quantized from, then the int8 comparison, sizes and
    latencies; a quantization-aware model's int8 file: its op table and the
    integer check, which that record prints itself.
    """
    if settings.quiet:
        return
    if fmt == "json":
        print_json(result.to_dict())
        return
    out = console()
    float_export = getattr(result, "float_export", None)
    if float_export is not None:
        out.print("The float32 model, checked before quantization:")
        _print_float_export(out, float_export)
        out.print(result)
    elif hasattr(result, "fold_report"):
        _print_float_export(out, result)
    else:
        out.print(result)
    out.print(f"Wrote {result.path}")


def _print_float_export(out: Any, result: Any) -> None:
    out.print(result)
    if result.fold_report is not None:
        totals = result.fold_report.to_dict()["totals"]
        out.print(
            f"Folded {totals['folded']} of {totals['bn_layers']} BatchNormalization layer(s) first"
            + ("" if result.op_counts_unfolded is not None else " (--compare-unfolded: the ops before the fold)")
            + "."
        )
    if result.model_dtype != result.dtype:
        out.print(
            f"The model computes in {result.model_dtype}; the file holds the same weights computed in {result.dtype}"
            + (" (--dtype float16 for a float16 file)." if result.dtype == "float32" else ".")
        )
    runtime = getattr(result, "runtime", "ONNX Runtime")
    if result.passes:
        out.print(f"Graph passes that changed it: {', '.join(result.passes)}")
    notes = dict.fromkeys(check.batch_note for check in result.checks if getattr(check, "batch_note", None))
    for note in notes:
        out.print(f"Checked at {note}.")
    for check in result.checks:
        verdict = "ok" if check.passed else "FAILED"
        if getattr(check, "discontinuous", None):
            out.print(f"{check.discontinuous}: the outputs before the selection are compared.")
        out.print(
            f"{runtime} vs Keras, batch {check.batch_size}: max |Δ| {error(check.max_abs_error)}, "
            f"max |Δ|/max |y| {error(check.max_rel_error)}: {verdict}"
        )
    if not result.checks:
        out.print("Not verified (--no-verify).")


def print_audit(report: Any, fmt: str, sections: dict[str, Any] | None = None) -> None:
    """The audit as rich tables, JSON (`AuditReport.to_dict`) or Markdown.

    ``sections`` are further reports by JSON key (``"quantization"``, ``"statistics"``):
    their tables follow the audit's, their dicts go under their keys.
    """
    extra = {key: value for key, value in (sections or {}).items() if value is not None}
    if fmt == "json":
        data = report.to_dict()
        data.update({key: value.to_dict() for key, value in extra.items()})
        print_json(data)
    elif fmt == "table":
        out = console()
        out.print(report)
        for value in extra.values():
            out.print(value)
    else:
        text = "\n\n".join([report.to_markdown(), *(value.to_markdown() for value in extra.values())])
        sys.stdout.write(text + "\n")


def print_calibrate(settings: Any, report: Any, moved: Any, output: Any, fmt: str) -> None:
    """The calibration report, how much the outputs moved, and the output path."""
    if settings.quiet:
        return
    if fmt == "json":
        print_json(
            {
                "output": str(output),
                "calibration": report.to_dict(),
                "outputs_moved": moved.to_dict() if moved else None,
            }
        )
        return
    out = console()
    out.print(report)
    if moved is None:
        out.print("Not verified (--no-verify).")
    else:
        out.print(
            f"Outputs moved: max |Δ| {error(moved.max_abs_error)} (max |Δ|/max |y| {error(moved.max_rel_error)}) "
            f"on a batch of {moved.batch_size}; the reloaded file reproduces the calibrated model"
        )
    out.print(f"Wrote {output}")


def _check_lines(checks: dict[str, Any]) -> list[str]:
    if not checks:
        return ["Not verified (--no-verify)."]
    lines = [f"Checked at {note}." for note in dict.fromkeys(r.batch_note for r in checks.values() if r.batch_note)]
    for stage, r in checks.items():
        if getattr(r, "discontinuous", None):
            lines.append(f"{stage.capitalize()}: {r.discontinuous}.")
            if r.layers:
                worst = max(r.layers, key=lambda c: c.margin)
                lines.append(
                    f"  {len(r.layers)} folded layers judged one by one on the inputs they receive, against "
                    f"themselves in float64: worst '{worst.layer}' max |Δ|/max |y| {error(worst.error)}, "
                    f"margin {error(worst.margin)}: {'ok' if all(c.passed for c in r.layers) else 'FAILED'}"
                )
            label = f"Largest error before the selection, {stage} vs original"
        else:
            label = f"Largest error, {stage} vs original"
        lines.append(
            f"{label}: max |Δ| {error(r.max_abs_error)} "
            f"(max |Δ|/max |y| {error(r.max_rel_error)}), batch {r.batch_size}, margin {error(r.margin)} "
            f"of {_allowed(r)}: {'ok' if r.passed else 'FAILED'}"
        )
    return lines


def _allowed(r: Any) -> str:
    """What the check allowed, in words: a relative error (scale-aware) or the element-wise tolerances."""
    if r.allowed is None:
        return "mismatched outputs" if r.atol is None else f"|Δ| ≤ {r.atol:g} + {r.rtol:g}·|y|"
    if getattr(r, "reference", "model") == "float64":
        # Judged against the original evaluated in float64 (kerasbn.deploy.verify.judge).
        extra = "" if r.float64_error is None else f"; the rewrite in float64 {error(r.float64_error)}"
        return f"allowed {error(r.allowed)} (vs float64; original's {r.dtype} error {error(r.own_error)}{extra})"
    noise = "not measured" if r.noise is None else f"noise {error(r.noise)}"
    return f"allowed {error(r.allowed)} ({noise})"


def print_rewrite(
    settings: Any, kind: str, report: Any, checks: dict[str, Any], output: Any, fmt: str, *, unchanged: bool = False
) -> None:
    """A rewrite's report (``kind``: ``"fold"``, ``"swap"``), its verification in memory and reloaded, the output.

    ``unchanged``: the rewrite changed nothing, so it was not compared in memory.
    """
    if settings.quiet:
        return
    if fmt == "json":
        print_json(
            {
                "output": str(output),
                kind: report.to_dict(),
                "changed": not unchanged,
                "verification": {stage: r.to_dict() for stage, r in checks.items()} or None,
            }
        )
        return
    out = console()
    out.print(report)
    if unchanged:
        out.print(
            "Nothing folded: the model is unchanged, so it was not compared in memory"
            + ("; the written file was reloaded and compared." if checks else ".")
        )
    for line in _check_lines(checks):
        out.print(line)
    out.print(f"Wrote {output}")


def print_strip(settings: Any, report: Any, checks: dict[str, Any], output: Any) -> None:
    """Which biases went, parameters before and after, the verification and the output path."""
    if settings.quiet:
        return
    out = console()
    out.print(report)
    for line in _check_lines(checks):
        out.print(line)
    out.print(f"Wrote {output}")
