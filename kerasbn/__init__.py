"""kerasbn: paper-exact Batch Normalization for Keras 3, and a BN fold engine.

``import kerasbn`` loads the layer and its ops, and the layers of
quantization-aware models (`kerasbn.qat.layers`), only: they register
themselves with Keras there, so that ``.keras`` files holding them load after
a plain ``import kerasbn``. The fold engine, file handling and exporters load
on first use (PEP 562). Nothing here touches the process's stderr or logging.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from kerasbn.layers import BatchNormalization
from kerasbn.qat import layers as _qat_layers  # noqa: F401 (registers the QAT layers, so QAT files load)

try:
    __version__ = version("kerasbn")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# Public name → the module that defines it.
_PUBLIC = {
    "audit": "kerasbn.folding.audit",
    "fold": "kerasbn.folding.fold",
    "FoldResult": "kerasbn.folding.fold",
    "strip_redundant_biases": "kerasbn.folding.biases",
    "StripResult": "kerasbn.folding.biases",
    "AuditReport": "kerasbn.folding.reports",
    "BNFinding": "kerasbn.folding.reports",
    "FoldReport": "kerasbn.folding.reports",
    "RedundantBias": "kerasbn.folding.reports",
    "StripReport": "kerasbn.folding.reports",
    "WeightProblem": "kerasbn.folding.reports",
    "load_model": "kerasbn.deploy.files",
    "save_model": "kerasbn.deploy.files",
    "verify": "kerasbn.deploy.verify",
    "VerifyResult": "kerasbn.deploy.verify",
    "Checks": "kerasbn.deploy.verify",
    "export": "kerasbn.deploy.export",
    "ExportResult": "kerasbn.deploy.export",
    "export_onnx": "kerasbn.deploy.export",
    "export_litert": "kerasbn.deploy.export",
    "export_int8": "kerasbn.deploy.export",
    "signature": "kerasbn.model_signature",
    "Signature": "kerasbn.model_signature",
    "audit_quantization": "kerasbn.deploy.quantize",
    "Int8Report": "kerasbn.deploy.reports",
    "QuantizationAudit": "kerasbn.deploy.reports",
    "calibrate": "kerasbn.statistics.calibrate",
    "CalibrationResult": "kerasbn.statistics.calibrate",
    "audit_statistics": "kerasbn.statistics.staleness",
    "swap": "kerasbn.statistics.swap",
    "SwapResult": "kerasbn.statistics.swap",
    "BNStaleness": "kerasbn.statistics.reports",
    "CalibrationReport": "kerasbn.statistics.reports",
    "StalenessReport": "kerasbn.statistics.reports",
    "SwapReport": "kerasbn.statistics.reports",
}

# Public subpackages, imported on first use like the names above.
_SUBPACKAGES = ("qat",)

__all__ = sorted([*_PUBLIC, *_SUBPACKAGES, "BatchNormalization"]) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        value = importlib.import_module(f"kerasbn.{name}")
        globals()[name] = value
        return value
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kerasbn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBPACKAGES))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from kerasbn import qat
    from kerasbn.deploy.export import ExportResult, export, export_int8, export_litert, export_onnx
    from kerasbn.deploy.files import load_model, save_model
    from kerasbn.deploy.quantize import audit_quantization
    from kerasbn.deploy.reports import Int8Report, QuantizationAudit
    from kerasbn.deploy.verify import Checks, VerifyResult, verify
    from kerasbn.folding.audit import audit
    from kerasbn.folding.biases import StripResult, strip_redundant_biases
    from kerasbn.folding.fold import FoldResult, fold
    from kerasbn.folding.reports import AuditReport, BNFinding, FoldReport, RedundantBias, StripReport, WeightProblem
    from kerasbn.model_signature import Signature, signature
    from kerasbn.statistics.calibrate import CalibrationResult, calibrate
    from kerasbn.statistics.reports import BNStaleness, CalibrationReport, StalenessReport, SwapReport
    from kerasbn.statistics.staleness import audit_statistics
    from kerasbn.statistics.swap import SwapResult, swap
