"""Quantization-aware training with Batch Normalization folded in: prepare → train → convert.

``prepare`` turns a float model into a trainable quantization-aware copy
(`kerasbn.qat.preparation`), which trains with ``fit`` and saves as ``.keras``;
``freeze`` / `FreezeBatchNorm` stop the BN statistics (Krishnamoorthi 2018); ``convert`` gives the folded float model; ``audit`` lists the
quantizers; the int8 exporters read the learned grids and ranges through the
protocol of `kerasbn.ops.fake_quant`. The math is in ``docs/qat.md``.

Names load on first use (PEP 562): ``import kerasbn`` registers the QAT
layers (`kerasbn.qat.layers`) so that saved QAT models load, and nothing more.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name → (module, attribute).
_PUBLIC = {
    "prepare": ("kerasbn.qat.preparation", "prepare"),
    "Preparation": ("kerasbn.qat.preparation", "Preparation"),
    "FloatLayer": ("kerasbn.qat.preparation", "FloatLayer"),
    "calibrate_ranges": ("kerasbn.qat.preparation", "calibrate_ranges"),
    "freeze": ("kerasbn.qat.freezing", "freeze"),
    "FreezeBatchNorm": ("kerasbn.qat.freezing", "FreezeBatchNorm"),
    "convert": ("kerasbn.qat.conversion", "convert"),
    "audit": ("kerasbn.qat.inspection", "audit"),
    "QATReport": ("kerasbn.qat.inspection", "QATReport"),
    "QuantizerRecord": ("kerasbn.qat.inspection", "QuantizerRecord"),
    "is_qat": ("kerasbn.ops.fake_quant", "is_quantization_aware"),
    "lowering": ("kerasbn.ops.fake_quant", "lowering"),
    "weight_grid": ("kerasbn.ops.fake_quant", "weight_grid"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    entry = _PUBLIC.get(name)
    if entry is None:
        raise AttributeError(f"module 'kerasbn.qat' has no attribute {name!r}")
    value = getattr(importlib.import_module(entry[0]), entry[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from kerasbn.ops.fake_quant import is_quantization_aware as is_qat
    from kerasbn.ops.fake_quant import lowering, weight_grid
    from kerasbn.qat.conversion import convert
    from kerasbn.qat.freezing import FreezeBatchNorm, freeze
    from kerasbn.qat.inspection import QATReport, QuantizerRecord, audit
    from kerasbn.qat.preparation import FloatLayer, Preparation, calibrate_ranges, prepare
