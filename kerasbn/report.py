"""Reports of the fold engine and how they look: rich tables, Markdown and JSON.

Every record a command prints is defined here with its rendering, so the
library's ``print(report)``, the CLI's tables and its ``--format json`` and
``markdown`` output cannot drift apart. rich is imported inside the
functions: building a report never needs it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kerasbn.folding.model_checks import WeightProblem

BN_COLUMNS = ("BN", "partner", "direction", "folds", "reason")
WEIGHT_COLUMNS = ("layer", "weight", "problem")


@dataclass(frozen=True)
class BNFinding:
    """What happens to one BatchNormalization layer.

    Attributes:
        layer: The BN layer's name.
        path: ``nested_model/…/layer`` for a BN inside nested models, else the name.
        partner: The layer it folds into; for a BN that stays, the neighbour the
            reason is about (``None`` when there is none).
        direction: ``"backward"`` (into the layer before), ``"forward"`` (into
            the layer after) or ``None``.
        foldable: Whether it folds.
        reason: Why not, one line; ``None`` when it folds.
        code: A `kerasbn.folding.plan.Reason` (a str) for the reason; ``None`` when it folds.
        parameters: The BN's weight count (all of it goes when it folds).
        how: For a BN that folds, ``"removed"`` (the layer leaves the model) or
            ``"in_place"`` (inside a custom layer or a model that cannot be
            rebuilt: the partner's weights absorb the BN, which stays as an
            exact identity); ``None`` when it stays.
    """

    layer: str
    path: str
    partner: str | None
    direction: str | None
    foldable: bool
    reason: str | None
    code: str | None
    parameters: int
    how: str | None = None


@dataclass(frozen=True)
class RedundantBias:
    """A Dense/Conv bias that the following BN's mean subtraction absorbs.

    Attributes:
        layer: The layer with the bias.
        path: Its path through nested models.
        bn: The BN that follows it.
        parameters: The bias size.
    """

    layer: str
    path: str
    bn: str
    parameters: int


class _Printable:
    """``str(report)`` is its table as plain text (what ``print(report)`` shows)."""

    def __str__(self) -> str:
        return render(self)


@dataclass
class AuditReport(_Printable):
    """The audit of one model.

    Attributes:
        model: The model's name.
        batch_norms: One `BNFinding` per BN layer, in graph order.
        redundant_biases: One `RedundantBias` per redundant bias.
        parameters: Weight count of the model.
        parameters_saved: Weights a fold removes (folded BN weights minus the
            biases that partners without one gain).
        weight_problems: One `kerasbn.WeightProblem` per weight holding NaN or infinite
            values or a negative BN variance: such a model cannot be folded or exported.
    """

    model: str
    batch_norms: list[BNFinding] = field(default_factory=list)
    redundant_biases: list[RedundantBias] = field(default_factory=list)
    parameters: int = 0
    parameters_saved: int = 0
    weight_problems: list[WeightProblem] = field(default_factory=list)

    @property
    def bn_layers(self) -> int:
        """Number of BN layers."""
        return len(self.batch_norms)

    @property
    def foldable(self) -> int:
        """Number of BN layers that fold."""
        return sum(f.foldable for f in self.batch_norms)

    @property
    def bias_parameters(self) -> int:
        """Weights `kerasbn.strip_redundant_biases` removes."""
        return sum(b.parameters for b in self.redundant_biases)

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``model``, ``totals``, ``batch_norms``, ``redundant_biases``, ``weight_problems``."""
        return {
            "model": self.model,
            "totals": {
                "bn_layers": self.bn_layers,
                "foldable": self.foldable,
                "not_foldable": self.bn_layers - self.foldable,
                "parameters": self.parameters,
                "parameters_saved": self.parameters_saved,
                "redundant_biases": len(self.redundant_biases),
                "bias_parameters": self.bias_parameters,
            },
            "batch_norms": [_jsonable_finding(f) for f in self.batch_norms],
            "redundant_biases": [asdict(b) for b in self.redundant_biases],
            "weight_problems": [asdict(p) for p in self.weight_problems],
        }

    def _caption(self) -> str:
        return (
            f"{self.foldable}/{self.bn_layers} BN layers fold, saving {self.parameters_saved:,} "
            f"of {self.parameters:,} parameters"
        )

    def _problems_caption(self) -> str:
        return f"{len(self.weight_problems)} weight(s) hold NaN, infinite values or negative variances: fold and export refuse the model"

    def _bias_caption(self) -> str:
        return f"{len(self.redundant_biases)} biases, {self.bias_parameters:,} parameters"

    def __rich__(self) -> Any:
        from rich.console import Group

        parts = [
            table(
                f"BatchNormalization layers in '{self.model}'", BN_COLUMNS, bn_rows(self.batch_norms), self._caption()
            )
        ]
        if self.redundant_biases:
            parts.append(
                table(
                    "Redundant biases",
                    ("layer", "BN", "parameters"),
                    bias_rows(self.redundant_biases),
                    self._bias_caption(),
                )
            )
        if self.weight_problems:
            parts.append(
                table(
                    "Weights that cannot be right",
                    WEIGHT_COLUMNS,
                    [[p.layer, p.weight, p.problem] for p in self.weight_problems],
                    self._problems_caption(),
                )
            )
        return Group(*parts)

    def to_markdown(self) -> str:
        """The audit as Markdown (for a pull request or a CI step summary)."""
        lines = [
            f"### BatchNormalization audit of `{self.model}`",
            "",
            markdown_table(BN_COLUMNS, bn_rows(self.batch_norms)),
            "",
            f"**{self.foldable}/{self.bn_layers}** BN layers fold, saving "
            f"{self.parameters_saved:,} of {self.parameters:,} parameters.",
        ]
        if self.redundant_biases:
            lines += [
                "",
                "#### Redundant biases",
                "",
                markdown_table(
                    ("layer", "BN", "parameters"), [[b.path, b.bn, b.parameters] for b in self.redundant_biases]
                ),
                "",
                f"{self._bias_caption()}.",
            ]
        if self.weight_problems:
            rows = [[p.layer, p.weight, p.problem] for p in self.weight_problems]
            lines += ["", "#### Weights that cannot be right", "", markdown_table(WEIGHT_COLUMNS, rows), ""]
            lines.append(f"{self._problems_caption()}.")
        return "\n".join(lines)


@dataclass
class FoldReport(_Printable):
    """What `kerasbn.fold` did.

    Attributes:
        model: The model's name.
        folded: `BNFinding` of each BN that was folded (``partner``, ``direction``).
        not_folded: `BNFinding` of each BN that stays, with ``reason`` and ``code``.
        parameters_before: Weight count of the original model.
        parameters_after: Weight count of the folded model.
        method: ``"removed"`` (folded BN layers left the model), ``"in_place"``
            (every fold rewrote weights in place) or ``"mixed"``; ``"none"`` when nothing folded.
        notes: Why folds that would remove a layer were done in place instead, if they were.
    """

    model: str
    folded: list[BNFinding] = field(default_factory=list)
    not_folded: list[BNFinding] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0
    method: str = "none"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``model``, ``totals``, ``folded``, ``not_folded``."""
        return {
            "model": self.model,
            "totals": {
                "bn_layers": len(self.folded) + len(self.not_folded),
                "folded": len(self.folded),
                "not_folded": len(self.not_folded),
                "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after,
                "parameters_saved": self.parameters_before - self.parameters_after,
                "in_place": sum(f.how == "in_place" for f in self.folded),
            },
            "method": self.method,
            "notes": list(self.notes),
            "folded": [_jsonable_finding(f) for f in self.folded],
            "not_folded": [_jsonable_finding(f) for f in self.not_folded],
        }

    def __rich__(self) -> Any:
        n = len(self.folded) + len(self.not_folded)
        caption = (
            f"{len(self.folded)}/{n} BN layers folded; parameters {self.parameters_before:,} → "
            f"{self.parameters_after:,}"
        )
        in_place = sum(f.how == "in_place" for f in self.folded)
        if in_place:
            caption += f"; {in_place} folded in place (the BN stays as an exact identity)"
        caption = "\n".join([caption, *self.notes])
        columns = ("BN", "partner", "direction", "folded", "reason")
        return table(f"Fold of '{self.model}'", columns, bn_rows(self.folded + self.not_folded), caption)


@dataclass
class StripReport(_Printable):
    """What `kerasbn.strip_redundant_biases` did.

    Attributes:
        model: The model's name.
        removed: One `RedundantBias` per bias moved into its BN.
        parameters_before: Weight count of the original model.
        parameters_after: Weight count of the new model.
    """

    model: str
    removed: list[RedundantBias] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``model``, ``totals``, ``removed``."""
        return {
            "model": self.model,
            "totals": {
                "removed": len(self.removed),
                "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after,
            },
            "removed": [asdict(b) for b in self.removed],
        }

    def __rich__(self) -> Any:
        caption = (
            f"{len(self.removed)} biases removed; parameters {self.parameters_before:,} → {self.parameters_after:,}"
        )
        return table(
            f"Redundant biases in '{self.model}'",
            ("layer", "BN", "parameters"),
            bias_rows(self.removed),
            caption,
            numeric=(2,),
            title_justify="left",
        )


@dataclass
class SwapReport:
    """What `kerasbn.swap` did.

    Attributes:
        model: The model's name.
        to: ``"kerasbn"`` or ``"keras"``.
        swapped: Paths of the BN layers now of the target class.
        stayed: ``(path, reason)`` of each BN that kept its class.
        inside_custom: Paths of swapped BNs held by custom layers: swapped in
            memory, but a saved file re-creates whatever BN the custom layer's code makes.
        notes: Settings the target class cannot hold, one line each.
        parameters: Weight count (unchanged by a swap).
    """

    model: str
    to: str
    swapped: list[str] = field(default_factory=list)
    stayed: list[tuple[str, str]] = field(default_factory=list)
    inside_custom: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parameters: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return {
            "model": self.model,
            "to": self.to,
            "totals": {"swapped": len(self.swapped), "stayed": len(self.stayed)},
            "swapped": list(self.swapped),
            "stayed": [{"path": p, "reason": r} for p, r in self.stayed],
            "inside_custom": list(self.inside_custom),
            "notes": list(self.notes),
            "parameters": self.parameters,
        }

    def __rich__(self) -> Any:
        target = "kerasbn.BatchNormalization" if self.to == "kerasbn" else "keras.layers.BatchNormalization"
        custom = set(self.inside_custom)
        rows = [[p, "yes", "inside a custom layer: in memory only" if p in custom else ""] for p in self.swapped]
        rows += [[p, "no", reason] for p, reason in self.stayed]
        caption = f"{len(self.swapped)} BN layers swapped to {target}, {len(self.stayed)} stayed"
        parts = [table(f"Swap of '{self.model}'", ("BN", "swapped", "note"), rows, caption)]
        from rich.console import Group

        return Group(*parts, *self.notes)

    def __str__(self) -> str:
        return render(self)


STALE_COLUMNS = ("BN", "values", "mean shift (σ)", "max shift (σ)", "variance ratio", "ratio range", "stale")


@dataclass(frozen=True)
class BNStaleness:
    """How far one BN's stored statistics are from the population statistics of some data.

    Per feature, the shift is ``(stored mean − population mean)/√(population var + ε)`` and
    the ratio ``(stored var + ε)/(population var + ε)``: what the stored statistics do to
    the layer's output relative to statistics that fit the data.

    Attributes:
        layer: The BN layer's name.
        path: ``outer/…/layer`` through nested models and custom layers.
        values: Values per feature the population statistics were computed from.
        mean_shift: Root mean square of the per-feature shifts, in units of σ.
        mean_shift_max: The largest per-feature ``|shift|``.
        variance_ratio: Geometric mean of the per-feature ratios (1 is right).
        variance_ratio_min: Smallest per-feature ratio.
        variance_ratio_max: Largest per-feature ratio.
        stale: Whether ``mean_shift`` or ``variance_ratio`` is beyond the thresholds.
    """

    layer: str
    path: str
    values: int
    mean_shift: float
    mean_shift_max: float
    variance_ratio: float
    variance_ratio_min: float
    variance_ratio_max: float
    stale: bool


@dataclass
class StalenessReport:
    """The stale-statistics audit of one model on some data (``kerasbn audit --data``).

    Each BN's population statistics are those of the inputs it receives in
    inference, every other BN keeping its stored statistics (one pass over the data).

    Attributes:
        model: The model's name.
        data: The data in words.
        samples: Number of samples.
        batch_size: Samples per mini-batch.
        max_shift: A BN is stale when its ``mean_shift`` exceeds this …
        max_ratio: … or its ``variance_ratio`` is above this or below its inverse.
        batch_norms: One `BNStaleness` per BN, in call order.
    """

    model: str
    data: str
    samples: int
    batch_size: int
    max_shift: float
    max_ratio: float
    batch_norms: list[BNStaleness] = field(default_factory=list)

    @property
    def stale(self) -> int:
        """Number of BN layers with stale statistics."""
        return sum(b.stale for b in self.batch_norms)

    @property
    def verdict(self) -> str:
        """One line: how many BN layers are stale and what to do."""
        n = self.stale
        if not n:
            return f"No BN layer has stale statistics on {self.samples:,} samples ({len(self.batch_norms)} checked)."
        layers = "BN layer has" if n == 1 else "BN layers have"
        return f"{n} {layers} stale statistics; run kerasbn calibrate"

    def to_dict(self) -> dict:
        """A JSON-ready dict: the data, thresholds, totals, verdict and one entry per BN."""
        return {
            "model": self.model,
            "data": self.data,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "thresholds": {"max_shift": self.max_shift, "max_ratio": self.max_ratio},
            "totals": {"bn_layers": len(self.batch_norms), "stale": self.stale},
            "verdict": self.verdict,
            "batch_norms": [asdict(b) for b in self.batch_norms],
        }

    def __rich__(self) -> Any:
        return staleness_table(f"BN statistics of '{self.model}' vs {self.data}", self.batch_norms, self.verdict)

    def to_markdown(self) -> str:
        """The stale-statistics audit as Markdown."""
        return "\n".join(
            [
                f"### BN statistics of `{self.model}` vs `{self.data}`",
                "",
                markdown_table(STALE_COLUMNS, staleness_rows(self.batch_norms)),
                "",
                f"**{self.verdict}**",
            ]
        )

    def __str__(self) -> str:
        return render(self)


@dataclass
class CalibrationReport:
    """What `kerasbn.calibrate` did.

    Attributes:
        model: The model's name.
        mode: ``"sequential"`` or ``"paper"``.
        data: The data in words.
        samples: Number of samples.
        batch_size: Samples per mini-batch.
        passes: Passes over the data.
        batch_norms: For each BN calibrated (in call order), how far its old
            statistics were from the new ones (`BNStaleness`).
        not_calibrated: Paths of BN layers the model never called.
    """

    model: str
    mode: str
    data: str
    samples: int
    batch_size: int
    passes: int
    batch_norms: list[BNStaleness] = field(default_factory=list)
    not_calibrated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return {
            "model": self.model,
            "mode": self.mode,
            "data": self.data,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "passes": self.passes,
            "totals": {"calibrated": len(self.batch_norms), "not_calibrated": len(self.not_calibrated)},
            "batch_norms": [asdict(b) for b in self.batch_norms],
            "not_calibrated": list(self.not_calibrated),
        }

    def __rich__(self) -> Any:
        caption = (
            f"{len(self.batch_norms)} BN layers calibrated ({self.mode}) on {self.samples:,} samples in batches of "
            f"{self.batch_size}, {self.passes} pass(es); old vs new statistics"
        )
        if self.not_calibrated:
            caption += f"; never called, left as they were: {', '.join(self.not_calibrated)}"
        return staleness_table(f"Calibration of '{self.model}'", self.batch_norms, caption)

    def __str__(self) -> str:
        return render(self)


def staleness_rows(records: Sequence[BNStaleness]) -> list[list[str]]:
    """Table rows for `BNStaleness` records."""
    return [
        [
            b.path,
            f"{b.values:,}",
            f"{b.mean_shift:.3f}",
            f"{b.mean_shift_max:.3f}",
            f"{b.variance_ratio:.3f}",
            f"{b.variance_ratio_min:.3g}–{b.variance_ratio_max:.3g}",
            "yes" if b.stale else "no",
        ]
        for b in records
    ]


def staleness_table(title: str, records: Sequence[BNStaleness], caption: str) -> Any:
    """The per-BN statistics table."""
    return table(title, STALE_COLUMNS, staleness_rows(records), caption, numeric=range(1, 6))


def op_table(op_counts: dict[str, int], before: dict[str, int] | None) -> list[tuple[str, int | None, int]]:
    """Rows (op type, count before the fold or ``None``, count after), onnx-simplifier style."""
    ops = sorted(set(before or {}) | set(op_counts))
    return [(op, None if before is None else before.get(op, 0), op_counts.get(op, 0)) for op in ops]


def export_table(
    title: str, op_counts: dict[str, int], before: dict[str, int] | None, size: int, size_before: int | None
) -> Any:
    """The before/after op-count table of an export, with totals and file sizes."""
    folded = before is not None
    rows: list[Sequence[str]] = []
    for op, n_before, n_after in op_table(op_counts, before):
        if not folded:
            rows.append((op, str(n_after)))
        elif n_before == n_after:
            rows.append((op, str(n_before), str(n_after)))
        else:
            rows.append((op, str(n_before), f"{n_after} ({n_after - n_before:+d})"))
    if folded:
        rows.append(("Total", str(sum(before.values())), str(sum(op_counts.values()))))
        rows.append(("Model size", file_size(size_before), file_size(size)))
        headers = ("Op", "Before fold", "After fold")
    else:
        rows.append(("Model size", file_size(size)))
        headers = ("Op", "Count")
    return table(title, headers, rows, numeric=range(1, 3), title_justify="left")


def table(
    title: str | None,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    caption: str | None = None,
    *,
    numeric: Sequence[int] = (),
    title_justify: str = "center",
) -> Any:
    """A rich `Table`; columns listed in ``numeric`` are right-aligned."""
    from rich.table import Table

    out = Table(title=title, caption=caption, title_justify=title_justify, show_lines=False)
    for i, header in enumerate(headers):
        out.add_column(header, justify="right" if i in numeric else "left", overflow="fold")
    for row in rows:
        out.add_row(*("" if cell is None else str(cell) for cell in row))
    return out


def render(*renderables: Any) -> str:
    """Plain text of rich renderables, 140 columns wide, no colour."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=140, color_system=None, force_terminal=False)
    for r in renderables:
        console.print(r)
    return buffer.getvalue().rstrip()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` escaped, newlines flattened)."""

    def cell(value: Any) -> str:
        return ("" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def bn_rows(findings: Sequence[BNFinding]) -> list[list[str]]:
    """Table rows for `BNFinding` records."""
    return [[f.path, f.partner or "", _direction(f), "yes" if f.foldable else "no", f.reason or ""] for f in findings]


def _direction(finding: BNFinding) -> str:
    direction = finding.direction or ""
    return f"{direction}, in place" if finding.how == "in_place" else direction


def bias_rows(biases: Sequence[RedundantBias]) -> list[list[str]]:
    """Table rows for `RedundantBias` records."""
    return [[b.path, b.bn, f"{b.parameters:,}"] for b in biases]


def file_size(n: int) -> str:
    """``n`` bytes for people: ``812 B``, ``3.1 KiB``, ``97.4 MiB``."""
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def _jsonable_finding(finding: BNFinding) -> dict:
    data = asdict(finding)
    # The Reason enum is a str; JSON gets its plain value.
    data["code"] = None if finding.code is None else str(finding.code)
    return data


@dataclass(frozen=True)
class Agreement:
    """How an int8 model's outputs compare with the float Keras model's on one set of inputs.

    Attributes:
        dataset: Where the inputs come from (``"calibration"``, or the file name).
        samples: Number of input rows.
        top1: Fraction of rows whose top-1 class is the float model's, the
            worst over the classification outputs (rank 2, two or more
            classes); ``None`` when the model has none.
        max_abs_error: ``max |Δ|`` over all outputs.
        mean_abs_error: ``mean |Δ|`` over all outputs.
        max_abs_reference: ``max |y|`` of the float outputs.
    """

    dataset: str
    samples: int
    top1: float | None
    max_abs_error: float
    mean_abs_error: float
    max_abs_reference: float

    @property
    def max_rel_error(self) -> float:
        """``max |Δ| / max |y|``."""
        return self.max_abs_error / self.max_abs_reference if self.max_abs_reference else float("inf")

    @property
    def mean_rel_error(self) -> float:
        """``mean |Δ| / max |y|``."""
        return self.mean_abs_error / self.max_abs_reference if self.max_abs_reference else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "max_rel_error": self.max_rel_error, "mean_rel_error": self.mean_rel_error}


@dataclass(frozen=True)
class Int8Report(_Printable):
    """What `kerasbn.export_int8` wrote, and how the int8 model compares with the float one.

    Attributes:
        path: The int8 file (written only when it passed).
        format: ``"onnx"`` or ``"litert"``.
        agreements: One `Agreement` per input set (calibration first).
        min_agreement: The top-1 agreement every set had to reach.
        size_float: Bytes of the float file (folded, verified).
        size_int8: Bytes of the int8 file.
        latency_float_ms: Median latency of the float file on one input row.
        latency_int8_ms: The same for the int8 file.
        op_counts_float: Op → count in the float file.
        op_counts_int8: Op → count in the int8 file.
        float_export: The verified float export it was quantized from
            (its fold report and checks against Keras).
    """

    path: Any
    format: str
    agreements: tuple[Agreement, ...]
    min_agreement: float
    size_float: int
    size_int8: int
    latency_float_ms: float
    latency_int8_ms: float
    op_counts_float: dict[str, int]
    op_counts_int8: dict[str, int]
    float_export: Any = None

    @property
    def passed(self) -> bool:
        """Every classification output agrees on at least `min_agreement` of every set's rows."""
        return all(a.top1 is None or a.top1 >= self.min_agreement for a in self.agreements)

    def to_dict(self) -> dict:
        """A JSON-ready dict (``kerasbn export --int8 --format json``)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "passed": self.passed,
            "min_agreement": self.min_agreement,
            "agreements": [a.to_dict() for a in self.agreements],
            "size_float": self.size_float,
            "size_int8": self.size_int8,
            "latency_float_ms": self.latency_float_ms,
            "latency_int8_ms": self.latency_int8_ms,
            "op_counts_float": dict(self.op_counts_float),
            "op_counts_int8": dict(self.op_counts_int8),
            "float_export": None if self.float_export is None else self.float_export.to_dict(),
        }

    def __rich__(self) -> Any:
        from rich.console import Group

        rows = [
            [
                a.dataset,
                f"{a.samples:,}",
                "—" if a.top1 is None else f"{100 * a.top1:.2f} %",
                f"{a.max_rel_error:.2e}",
                f"{a.mean_rel_error:.2e}",
            ]
            for a in self.agreements
        ]
        name = {"onnx": "ONNX", "litert": "LiteRT"}.get(self.format, self.format)
        agreement = table(
            f"int8 {name} vs the float Keras model",
            ("inputs", "rows", "top-1 agreement", "max error", "mean error"),
            rows,
            f"errors: |Δ| over the float model's max |y|; top-1 agreement required: {100 * self.min_agreement:.2f} %",
            numeric=range(1, 5),
            title_justify="left",
        )
        ratio = self.size_int8 / self.size_float if self.size_float else float("nan")
        sizes = table(
            None,
            ("", "float32", "int8"),
            [
                ("Model size", file_size(self.size_float), f"{file_size(self.size_int8)} ({100 * ratio:.0f} %)"),
                ("Latency, 1 row", f"{self.latency_float_ms:.3f} ms", f"{self.latency_int8_ms:.3f} ms"),
                ("Ops", str(sum(self.op_counts_float.values())), str(sum(self.op_counts_int8.values()))),
            ],
            numeric=(1, 2),
        )
        return Group(agreement, sizes)


@dataclass(frozen=True)
class WeightRange:
    """How a fold changed the spread of one kernel's per-output-channel ranges.

    Per-tensor int8 gives every channel the step ``R/127`` of the widest one
    (``R = max_c r_c``, ``r_c = max |W_c|``); a channel ``R/r_c`` times
    narrower keeps only ``127·r_c/R`` levels. Per-channel quantization gives
    each channel its own step.

    Attributes:
        layer: Path of the layer that absorbed the BN.
        bn: The folded BN.
        weight: The kernel the fold rescaled (``kernel``, ``pointwise_kernel``, ...).
        channels: Output channels of that kernel.
        ratio_before: ``R / min_c r_c`` before the fold (all-zero channels left out).
        ratio_after: The same after the fold.
        flagged: ``ratio_after`` exceeds the audit's threshold: keep per-channel quantization.
    """

    layer: str
    bn: str
    weight: str
    channels: int
    ratio_before: float
    ratio_after: float
    flagged: bool

    @property
    def levels_after(self) -> float:
        """int8 levels (of 127) the narrowest channel keeps under per-tensor quantization, after the fold."""
        return 127.0 / self.ratio_after


@dataclass
class QuantizationAudit(_Printable):
    """Per-tensor vs per-channel weight ranges of every layer a BN folds into.

    Attributes:
        model: The model's name.
        layers: One `WeightRange` per folded kernel.
        threshold: The ratio above which a layer is flagged.
    """

    model: str
    layers: list[WeightRange] = field(default_factory=list)
    threshold: float = 8.0

    @property
    def flagged(self) -> list[WeightRange]:
        return [w for w in self.layers if w.flagged]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "threshold": self.threshold,
            "flagged": len(self.flagged),
            "layers": [{**asdict(w), "levels_after": w.levels_after} for w in self.layers],
        }

    def _rows(self) -> list[list[str]]:
        return [
            [
                w.layer,
                w.bn,
                w.weight,
                str(w.channels),
                f"{w.ratio_before:.1f}×",
                f"{w.ratio_after:.1f}×",
                f"{w.levels_after:.0f}",
                "per-channel" if w.flagged else "either",
            ]
            for w in self.layers
        ]

    # "spread": widest / narrowest per-channel range; "levels": int8 levels the narrowest channel keeps per-tensor.
    _COLUMNS = ("layer", "BN", "weight", "channels", "spread before", "after", "levels", "int8 weights")

    def _caption(self) -> str:
        return (
            f"spread: widest / narrowest output-channel range of the kernel; levels: of 127, what the narrowest "
            f"channel keeps with per-tensor int8. {len(self.flagged)}/{len(self.layers)} folded layers spread over "
            f"{self.threshold:g}× (quantize those per channel)"
        )

    def __rich__(self) -> Any:
        return table(
            "Weight ranges after the fold (per-tensor vs per-channel int8)",
            self._COLUMNS,
            self._rows(),
            self._caption(),
            numeric=range(3, 7),
        )

    def to_markdown(self) -> str:
        return "\n".join(
            [
                "#### Weight ranges after the fold (per-tensor vs per-channel int8)",
                "",
                markdown_table(self._COLUMNS, self._rows()),
                "",
                f"{self._caption()}.",
            ]
        )
