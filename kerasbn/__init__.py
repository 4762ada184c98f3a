"""kerasbn: paper-exact Batch Normalization for Keras 3, and a BN fold engine."""

from importlib.metadata import PackageNotFoundError, version

from kerasbn.quiet import quiet_stderr

with quiet_stderr():
    import keras  # noqa: F401  (TensorFlow's start-up noise is held back here)

from kerasbn.audit import AuditReport, BNFinding, RedundantBias, audit  # noqa: E402
from kerasbn.biases import strip_redundant_biases  # noqa: E402
from kerasbn.export import export_onnx  # noqa: E402
from kerasbn.fold import FoldReport, FoldResult, fold  # noqa: E402
from kerasbn.io import load_model, save_model  # noqa: E402
from kerasbn.layers import BatchNormalization  # noqa: E402
from kerasbn.verify import VerifyResult, verify  # noqa: E402

try:
    __version__ = version("kerasbn")  # one source of truth: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AuditReport",
    "BNFinding",
    "BatchNormalization",
    "FoldReport",
    "FoldResult",
    "RedundantBias",
    "VerifyResult",
    "__version__",
    "audit",
    "export_onnx",
    "fold",
    "load_model",
    "save_model",
    "strip_redundant_biases",
    "verify",
]
