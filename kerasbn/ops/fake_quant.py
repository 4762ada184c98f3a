"""Which graph operations fake quantization lowers to while a model is traced (the exporters' switch).

The fake-quantization math itself is `kerasbn.qat.quantizers`; how it becomes
graph operations matters to exporters only, which sit below the
quantization-aware layers (`kerasbn.deploy` never imports `kerasbn.qat`), so
the switch lives here: ``"fake_quant"`` (TensorFlow's FakeQuant ops, which the
LiteRT converter turns into int8 kernels), ``"qdq"`` (weights as
``QuantizeAndDequantizeV3`` with an axis, which tf2onnx turns into
``QuantizeLinear``/``DequantizeLinear``) or ``"ops"`` (portable `keras.ops`,
the only lowering on JAX and PyTorch).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import keras

LOWERINGS = ("fake_quant", "qdq", "ops")
_state = threading.local()


@contextlib.contextmanager
def lowering(name: str) -> Iterator[None]:
    """Choose, for graphs traced inside the block, the operations fake quantization lowers to.

    Args:
        name: ``"fake_quant"`` (default: TensorFlow's FakeQuant ops, for
            LiteRT), ``"qdq"`` (``QuantizeAndDequantizeV3`` for weights, for
            tf2onnx) or ``"ops"`` (portable `keras.ops`). On JAX and PyTorch
            every lowering is ``"ops"``.

    Example:
        >>> from kerasbn.ops import fake_quant
        >>> with fake_quant.lowering("qdq"):
        ...     fake_quant.current_lowering()
        'qdq'
        >>> fake_quant.current_lowering() in ("fake_quant", "ops")
        True
    """
    if name not in LOWERINGS:
        raise ValueError(f"Unknown lowering {name!r}; choose one of {', '.join(LOWERINGS)}.")
    previous = getattr(_state, "lowering", None)
    _state.lowering = name
    try:
        yield
    finally:
        _state.lowering = previous


def current_lowering() -> str:
    """The lowering in force: the innermost `lowering` block's, else the backend's default."""
    if keras.backend.backend() != "tensorflow":
        return "ops"
    return getattr(_state, "lowering", None) or "fake_quant"
