"""The fold engine's records: what the audit found and what a fold or a bias strip did.

`BNFinding` is the planner's verdict on one BN (`kerasbn.folding.plan`),
`RedundantBias` one bias a following BN absorbs, `WeightProblem` one weight
no model should hold (`kerasbn.folding.model_checks`); `AuditReport`, `FoldReport`
and `StripReport` are what `kerasbn.audit`, `kerasbn.fold` and
`kerasbn.strip_redundant_biases` return. Each report follows the package's
one printable protocol (`kerasbn.printable`): it says what it shows, and
`kerasbn.report` draws that as text, rich tables or Markdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from kerasbn.printable import Printable, Table

BN_COLUMNS = ("BN", "partner", "direction", "folds", "reason")
BIAS_COLUMNS = ("layer", "BN", "parameters")
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

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields (``code`` as its plain string)."""
        data = asdict(self)
        # The Reason enum is a str; JSON gets its plain value.
        data["code"] = None if self.code is None else str(self.code)
        return data


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


@dataclass(frozen=True)
class WeightProblem:
    """A weight no model should hold: NaN or infinite values, or a BN variance below zero.

    Attributes:
        layer: The layer's path (``nested_model/…/layer``).
        weight: The weight's name (``moving_variance``, ``kernel``…).
        problem: What is wrong, e.g. ``"3 NaN among its 16 values"``.
    """

    layer: str
    weight: str
    problem: str


@dataclass
class AuditReport(Printable):
    """The audit of one model.

    Attributes:
        model: The model's name.
        batch_norms: One `BNFinding` per BN layer, in graph order.
        redundant_biases: One `RedundantBias` per redundant bias.
        parameters: Weight count of the model.
        parameters_saved: Weights a fold removes (folded BN weights minus the
            biases that partners without one gain).
        weight_problems: One `WeightProblem` per weight holding NaN or infinite
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
            "batch_norms": [f.to_dict() for f in self.batch_norms],
            "redundant_biases": [asdict(b) for b in self.redundant_biases],
            "weight_problems": [asdict(p) for p in self.weight_problems],
        }

    def view(self) -> list[Table | str]:
        """The BN table and, when there are any, the redundant biases and the weights that cannot be right."""
        saving = f"saving {self.parameters_saved:,} of {self.parameters:,} parameters"
        sections: list[Table | str] = [
            Table(
                title=f"BatchNormalization layers in '{self.model}'",
                headers=BN_COLUMNS,
                rows=bn_rows(self.batch_norms),
                caption=f"{self.foldable}/{self.bn_layers} BN layers fold, {saving}",
                heading=f"### BatchNormalization audit of `{self.model}`",
                summary=f"**{self.foldable}/{self.bn_layers}** BN layers fold, {saving}.",
            )
        ]
        if self.redundant_biases:
            sections.append(
                Table(
                    title="Redundant biases",
                    headers=BIAS_COLUMNS,
                    rows=bias_rows(self.redundant_biases),
                    caption=f"{len(self.redundant_biases)} biases, {self.bias_parameters:,} parameters",
                    markdown_rows=[[b.path, b.bn, b.parameters] for b in self.redundant_biases],
                )
            )
        if self.weight_problems:
            sections.append(
                Table(
                    title="Weights that cannot be right",
                    headers=WEIGHT_COLUMNS,
                    rows=[[p.layer, p.weight, p.problem] for p in self.weight_problems],
                    caption=f"{len(self.weight_problems)} weight(s) hold NaN, infinite values or negative variances: "
                    "fold and export refuse the model",
                )
            )
        return sections


@dataclass
class FoldReport(Printable):
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
            "folded": [f.to_dict() for f in self.folded],
            "not_folded": [f.to_dict() for f in self.not_folded],
        }

    def view(self) -> list[Table | str]:
        """One table of every BN, folded first; the caption counts and explains in-place folds."""
        n = len(self.folded) + len(self.not_folded)
        caption = (
            f"{len(self.folded)}/{n} BN layers folded; parameters {self.parameters_before:,} → "
            f"{self.parameters_after:,}"
        )
        in_place = sum(f.how == "in_place" for f in self.folded)
        if in_place:
            caption += f"; {in_place} folded in place (the BN stays as an exact identity)"
        return [
            Table(
                title=f"Fold of '{self.model}'",
                headers=("BN", "partner", "direction", "folded", "reason"),
                rows=bn_rows(self.folded + self.not_folded),
                caption="\n".join([caption, *self.notes]),
            )
        ]


@dataclass
class StripReport(Printable):
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

    def view(self) -> list[Table | str]:
        """The biases removed, with the parameter counts before and after."""
        return [
            Table(
                title=f"Redundant biases in '{self.model}'",
                headers=BIAS_COLUMNS,
                rows=bias_rows(self.removed),
                caption=f"{len(self.removed)} biases removed; parameters {self.parameters_before:,} → "
                f"{self.parameters_after:,}",
                numeric=(2,),
                title_justify="left",
            )
        ]


def bn_rows(findings: Sequence[BNFinding]) -> list[list[str]]:
    """Table rows for `BNFinding` records."""
    return [[f.path, f.partner or "", _direction(f), "yes" if f.foldable else "no", f.reason or ""] for f in findings]


def _direction(finding: BNFinding) -> str:
    direction = finding.direction or ""
    return f"{direction}, in place" if finding.how == "in_place" else direction


def bias_rows(biases: Sequence[RedundantBias]) -> list[list[str]]:
    """Table rows for `RedundantBias` records."""
    return [[b.path, b.bn, f"{b.parameters:,}"] for b in biases]
