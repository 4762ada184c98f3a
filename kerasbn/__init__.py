"""kerasbn: paper-exact Batch Normalization for Keras 3, and a BN fold engine."""

from kerasbn.quiet import quiet_stderr

with quiet_stderr():
    import keras  # noqa: F401  (TensorFlow's start-up noise is held back here)

from kerasbn.export import export_onnx  # noqa: E402
from kerasbn.io import load_model, save_model  # noqa: E402
from kerasbn.layers import BatchNormalization  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BatchNormalization", "__version__", "export_onnx", "load_model", "save_model"]
