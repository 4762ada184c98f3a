"""`kerasbn.qat.audit`: the quantizers of a quantization-aware model, their bits and ranges.

Read-only. One row per quantizer: each layer with weight fake-quant (its
bits, per channel or per tensor, whether a BN is fused into it and whether
its statistics are frozen, the range of its folded kernel) and each
activation quantizer (its bits and its range as the fake-quant nudges it).
`kerasbn audit` shows this table for a QAT model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import keras
import numpy as np

from kerasbn.ops import fake_quant
from kerasbn.printable import Printable, Table
from kerasbn.qat import layers

COLUMNS = ("layer", "quantizes", "bits", "granularity", "range", "BN")


@dataclass(frozen=True)
class QuantizerRecord:
    """One quantizer of a QAT model.

    Attributes:
        layer: The layer's name.
        kind: ``"weights"`` (a kernel grid) or ``"activation"``.
        bits: Bits of the grid.
        granularity: ``"per_channel"`` or ``"per_tensor"``.
        low: Lower end of the range (``−max|w'|`` for weights, the nudged minimum for activations).
        high: Upper end of the range.
        bn: For a fused layer, ``"fused"`` or ``"fused, frozen"``; else ``None``.
    """

    layer: str
    kind: str
    bits: int
    granularity: str
    low: float
    high: float
    bn: str | None = None


@dataclass
class QATReport(Printable):
    """The quantizers of one QAT model (``print(report)`` shows the table).

    Attributes:
        model: The model's name.
        quantizers: One `QuantizerRecord` per quantizer, in layer order.
    """

    model: str
    quantizers: list[QuantizerRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``model``, ``quantizers``."""
        return {"model": self.model, "quantizers": [asdict(q) for q in self.quantizers]}

    def _rows(self) -> list[list[str]]:
        return [
            [
                q.layer,
                q.kind,
                str(q.bits),
                q.granularity.replace("_", " "),
                f"[{q.low + 0.0:.4g}, {q.high + 0.0:.4g}]",
                q.bn or "",
            ]
            for q in self.quantizers
        ]

    def _caption(self) -> str:
        weights = sum(q.kind == "weights" for q in self.quantizers)
        return f"{weights} weight and {len(self.quantizers) - weights} activation quantizers"

    def view(self) -> list[Table | str]:
        """One table of every quantizer."""
        return [
            Table(
                title=f"Quantizers in '{self.model}'",
                headers=COLUMNS,
                rows=self._rows(),
                caption=self._caption(),
                heading=f"### Quantizers of `{self.model}`",
            )
        ]


def _weights(layer: layers.QuantizedWeights) -> QuantizerRecord:
    kernel, bits, per_channel = layer.quantized_kernel()
    a = float(np.max(np.abs(keras.ops.convert_to_numpy(kernel))))
    bn = None
    if isinstance(layer, layers.FusedBatchNorm):
        bn = "fused, frozen" if bool(keras.ops.convert_to_numpy(layer.frozen())) else "fused"
    granularity = "per_channel" if per_channel else "per_tensor"
    return QuantizerRecord(layer=layer.name, kind="weights", bits=bits, granularity=granularity, low=-a, high=a, bn=bn)


def _activation(layer: layers.ActivationQuantizer) -> QuantizerRecord:
    lo, hi, _ = (float(keras.ops.convert_to_numpy(v)) for v in layer.nudged_range())
    return QuantizerRecord(
        layer=layer.name, kind="activation", bits=layer.bits, granularity="per_tensor", low=lo, high=hi
    )


def audit(model: keras.Model) -> QATReport:
    """List the quantizers of a QAT model (`kerasbn.qat.prepare`), their bits and ranges.

    Args:
        model: Any Keras model; a model without quantizers gives an empty report.

    Returns:
        A `QATReport`.
    """
    records = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if fake_quant.is_weight_quantized(layer):
            records.append(_weights(layer))
        elif fake_quant.is_activation_quantizer(layer):
            records.append(_activation(layer))
    return QATReport(model.name, records)
