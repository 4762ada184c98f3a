"""The records of the population-statistics half: what swap, the stale-statistics audit and calibrate found or did.

`BNStaleness` is one BN's stored statistics against those of some data
(`kerasbn.statistics.staleness.compare_statistics`); `StalenessReport`,
`CalibrationReport` and `SwapReport` are what `kerasbn.audit_statistics`,
`kerasbn.calibrate` and `kerasbn.swap` report. Each report follows the
package's one printable protocol (`kerasbn.printable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from kerasbn.printable import Printable, Table


@dataclass
class SwapReport(Printable):
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

    def view(self) -> list[Table | str]:
        """Each BN swapped or not, then the settings the target class could not hold."""
        target = "kerasbn.BatchNormalization" if self.to == "kerasbn" else "keras.layers.BatchNormalization"
        custom = set(self.inside_custom)
        rows = [[p, "yes", "inside a custom layer: in memory only" if p in custom else ""] for p in self.swapped]
        rows += [[p, "no", reason] for p, reason in self.stayed]
        caption = f"{len(self.swapped)} BN layers swapped to {target}, {len(self.stayed)} stayed"
        return [
            Table(title=f"Swap of '{self.model}'", headers=("BN", "swapped", "note"), rows=rows, caption=caption),
            *self.notes,
        ]


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
class StalenessReport(Printable):
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

    def view(self) -> list[Table | str]:
        """The per-BN statistics table; the verdict below it."""
        return [
            staleness_table(
                f"BN statistics of '{self.model}' vs {self.data}",
                self.batch_norms,
                self.verdict,
                heading=f"### BN statistics of `{self.model}` vs `{self.data}`",
                summary=f"**{self.verdict}**",
            )
        ]


@dataclass
class CalibrationReport(Printable):
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

    def view(self) -> list[Table | str]:
        """How far each BN's old statistics were from the new ones."""
        caption = (
            f"{len(self.batch_norms)} BN layers calibrated ({self.mode}) on {self.samples:,} samples in batches of "
            f"{self.batch_size}, {self.passes} pass(es); old vs new statistics"
        )
        if self.not_calibrated:
            caption += f"; never called, left as they were: {', '.join(self.not_calibrated)}"
        return [staleness_table(f"Calibration of '{self.model}'", self.batch_norms, caption)]


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


def staleness_table(title: str, records: Sequence[BNStaleness], caption: str, **markdown: str) -> Table:
    """The per-BN statistics table (``markdown``: its ``heading`` and ``summary`` there)."""
    return Table(
        title=title,
        headers=STALE_COLUMNS,
        rows=staleness_rows(records),
        caption=caption,
        numeric=range(1, 6),
        **markdown,
    )
