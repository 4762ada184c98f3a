"""The records of the int8 step and of the weight-range audit (`kerasbn.deploy.quantize` produces them).

`Int8Report` is what `kerasbn.export` returns with ``int8``: one `Agreement`
per input set, sizes, latencies and op counts; `QuantizationAudit` is
`kerasbn.audit_quantization`'s answer, one `WeightRange` per kernel a fold
rescaled. Both follow the package's one printable protocol (`kerasbn.printable`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kerasbn.printable import Printable, Table


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
class Int8Report(Printable):
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

    def view(self) -> list[Table | str]:
        """The agreement per input set, then sizes, latencies and op totals side by side."""
        from kerasbn.report import file_size

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
        agreement = Table(
            title=f"int8 {name} vs the float Keras model",
            headers=("inputs", "rows", "top-1 agreement", "max error", "mean error"),
            rows=rows,
            caption=f"errors: |Δ| over the float model's max |y|; top-1 agreement required: "
            f"{100 * self.min_agreement:.2f} %",
            numeric=range(1, 5),
            title_justify="left",
        )
        ratio = self.size_int8 / self.size_float if self.size_float else float("nan")
        sizes = Table(
            title=None,
            headers=("", "float32", "int8"),
            rows=[
                ("Model size", file_size(self.size_float), f"{file_size(self.size_int8)} ({100 * ratio:.0f} %)"),
                ("Latency, 1 row", f"{self.latency_float_ms:.3f} ms", f"{self.latency_int8_ms:.3f} ms"),
                ("Ops", str(sum(self.op_counts_float.values())), str(sum(self.op_counts_int8.values()))),
            ],
            numeric=(1, 2),
        )
        return [agreement, sizes]


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
class QuantizationAudit(Printable):
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

    def view(self) -> list[Table | str]:
        """One row per folded kernel: its channel spread before and after, and which int8 weights suit it."""
        return [
            Table(
                title="Weight ranges after the fold (per-tensor vs per-channel int8)",
                headers=self._COLUMNS,
                rows=self._rows(),
                caption=self._caption(),
                numeric=range(3, 7),
            )
        ]
