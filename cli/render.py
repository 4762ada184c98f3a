"""Printing: rich tables on a terminal, plain text when piped, JSON and Markdown
for machines and pull requests; a progress spinner only on a terminal.

rich is imported inside the functions so `kerasbn --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, Iterator, Sequence


def console() -> Any:
    from rich.console import Console

    # soft_wrap keeps long lines (paths) whole when output is piped into a file.
    return Console(soft_wrap=not sys.stdout.isatty(), highlight=False)


@contextlib.contextmanager
def progress(quiet: bool) -> Iterator[Callable[[str], None]]:
    """Yield `step(message)`; shows a spinner on stderr only when stdout and stderr are terminals."""
    if quiet or not (sys.stdout.isatty() and sys.stderr.isatty()):
        yield lambda _message: None
        return
    from rich.console import Console

    with Console(stderr=True).status("Starting") as status:
        yield lambda message: status.update(f"{message}…")


def table(
    title: str | None, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = ()
) -> Any:
    """A rich Table; columns listed in `numeric` are right-aligned."""
    from rich.table import Table

    result = Table(title=title, title_justify="left", show_lines=False)
    for i, header in enumerate(headers):
        result.add_column(header, justify="right" if i in numeric else "left", overflow="fold")
    for row in rows:
        result.add_row(*("" if cell is None else str(cell) for cell in row))
    return result


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return ("" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


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


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def op_rows(op_table: Sequence[tuple[str, int | None, int]]) -> list[tuple[str, str, str]]:
    """onnx-simplifier's before/after rows, the changed ones marked."""
    rows = []
    for op, before, after in op_table:
        if before is None:
            rows.append((op, "", str(after)))
        else:
            rows.append((op, str(before), str(after) if before == after else f"{after} ({after - before:+d})"))
    return rows


def print_export(settings: Any, result: Any) -> None:
    """What export_onnx wrote: the op table and the ONNX Runtime checks."""
    if settings.quiet:
        return
    out = console()
    folded = result.op_counts_unfolded is not None
    headers = ("Op", "Before fold", "After fold") if folded else ("Op", "Count")
    rows = op_rows(result.op_table()) if folded else [(op, n) for op, n in result.op_counts.items()]
    if folded:
        totals = (sum(result.op_counts_unfolded.values()), sum(result.op_counts.values()))
        rows.append(("Total", str(totals[0]), str(totals[1])))
        rows.append(("Model size", _size(result.size_unfolded), _size(result.size)))
    else:
        rows.append(("Model size", _size(result.size)))
    out.print(table(f"ONNX graph of {result.path.name} (opset {result.opset})", headers, rows, numeric=range(1, 3)))
    for check in result.checks:
        verdict = "ok" if check.passed else "FAILED"
        out.print(
            f"ONNX Runtime vs Keras, batch {check.batch_size}: max |Δ| {error(check.max_abs_error)}, "
            f"max rel {error(check.max_rel_error)}: {verdict}"
        )
    if not result.checks:
        out.print("Not verified (--no-verify).")
    out.print(f"Wrote {result.path}")


def print_audit(report: Any, fmt: str) -> None:
    """The audit as rich tables, JSON (`AuditReport.to_dict`) or Markdown."""
    if fmt == "json":
        print_json(report.to_dict())
        return
    if fmt == "table":
        console().print(report)
        return
    data = report.to_dict()
    totals = data["totals"]
    lines = [
        f"### BatchNormalization audit of `{data['model']}`",
        "",
        markdown_table(
            ("BN", "partner", "direction", "folds", "reason"),
            [
                (f["path"], f["partner"], f["direction"], "yes" if f["foldable"] else "no", f["reason"])
                for f in data["batch_norms"]
            ],
        ),
        "",
        f"**{totals['foldable']}/{totals['bn_layers']}** BN layers fold, saving "
        f"{totals['parameters_saved']:,} of {totals['parameters']:,} parameters.",
    ]
    if data["redundant_biases"]:
        lines += [
            "",
            "#### Redundant biases",
            "",
            markdown_table(
                ("layer", "BN", "parameters"), [(b["path"], b["bn"], b["parameters"]) for b in data["redundant_biases"]]
            ),
            "",
            f"{totals['redundant_biases']} biases, {totals['bias_parameters']:,} parameters.",
        ]
    sys.stdout.write("\n".join(lines) + "\n")


def _check_lines(checks: dict[str, Any]) -> list[str]:
    if not checks:
        return ["Not verified (--no-verify)."]
    return [
        f"Largest error, {stage} vs original: max |Δ| {error(r.max_abs_error)} "
        f"(max |Δ|/max |y| {error(r.max_rel_error)}), batch {r.batch_size}: {'ok' if r.passed else 'FAILED'}"
        for stage, r in checks.items()
    ]


def print_fold(settings: Any, report: Any, checks: dict[str, Any], output: Any, fmt: str) -> None:
    """The fold report, the verification of the model in memory and reloaded, and the output path."""
    if settings.quiet:
        return
    if fmt == "json":
        print_json(
            {
                "output": str(output),
                "fold": report.to_dict(),
                "verification": {stage: r.to_dict() for stage, r in checks.items()} or None,
            }
        )
        return
    out = console()
    out.print(report)
    for line in _check_lines(checks):
        out.print(line)
    out.print(f"Wrote {output}")


def print_strip(
    settings: Any, removed: Sequence[Any], original: Any, stripped: Any, checks: dict[str, Any], output: Any
) -> None:
    """Which biases went, parameters before and after, the verification and the output path."""
    if settings.quiet:
        return
    out = console()
    rows = [(b.path, b.bn, f"{b.parameters:,}") for b in removed]
    before, after = original.count_params(), stripped.count_params()
    caption = f"{len(removed)} biases removed; parameters {before:,} → {after:,}"
    result = table(f"Redundant biases in '{original.name}'", ("layer", "BN", "parameters"), rows, numeric=(2,))
    result.caption = caption
    out.print(result)
    for line in _check_lines(checks):
        out.print(line)
    out.print(f"Wrote {output}")
