"""kerasbn: paper-exact Batch Normalization for Keras 3, and a BN fold engine.

The package imports lazily (PEP 562): ``import kerasbn`` loads nothing
heavy, ``kerasbn.BatchNormalization`` loads the layer and its ops only, and
the fold engine, file handling and exporters load on first use. Nothing here
touches the process's stderr or logging.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("kerasbn")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# Public name → the module that defines it.
_PUBLIC = {
    "BatchNormalization": "kerasbn.layers.batch_normalization",
    "audit": "kerasbn.folding.audit",
    "fold": "kerasbn.folding.fold",
    "FoldResult": "kerasbn.folding.fold",
    "strip_redundant_biases": "kerasbn.folding.biases",
    "StripResult": "kerasbn.folding.biases",
    "AuditReport": "kerasbn.report",
    "BNFinding": "kerasbn.report",
    "FoldReport": "kerasbn.report",
    "RedundantBias": "kerasbn.report",
    "StripReport": "kerasbn.report",
    "load_model": "kerasbn.deploy.files",
    "save_model": "kerasbn.deploy.files",
    "verify": "kerasbn.deploy.verify",
    "VerifyResult": "kerasbn.deploy.verify",
    "export_onnx": "kerasbn.deploy.onnx",
    "calibrate": "kerasbn.statistics.calibrate",
    "CalibrationResult": "kerasbn.statistics.calibrate",
    "audit_statistics": "kerasbn.statistics.staleness",
    "swap": "kerasbn.statistics.swap",
    "SwapResult": "kerasbn.statistics.swap",
    "BNStaleness": "kerasbn.report",
    "CalibrationReport": "kerasbn.report",
    "StalenessReport": "kerasbn.report",
    "SwapReport": "kerasbn.report",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasbn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from kerasbn.deploy.files import load_model, save_model
    from kerasbn.deploy.onnx import export_onnx
    from kerasbn.deploy.verify import VerifyResult, verify
    from kerasbn.folding.audit import audit
    from kerasbn.folding.biases import StripResult, strip_redundant_biases
    from kerasbn.folding.fold import FoldResult, fold
    from kerasbn.layers.batch_normalization import BatchNormalization
    from kerasbn.report import (
        AuditReport,
        BNFinding,
        BNStaleness,
        CalibrationReport,
        FoldReport,
        RedundantBias,
        StalenessReport,
        StripReport,
        SwapReport,
    )
    from kerasbn.statistics.calibrate import CalibrationResult, calibrate
    from kerasbn.statistics.staleness import audit_statistics
    from kerasbn.statistics.swap import SwapResult, swap
