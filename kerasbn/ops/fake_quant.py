"""The fake-quantization math of quantization-aware training, in one place.

It sits in ``ops/`` (the math floor) so that both `kerasbn.qat` (training)
and `kerasbn.deploy` (export, which must not import ``qat/``) use it; the
duck-typed protocol the exporters read off a quantization-aware layer is at
the end of this docstring.

Weights are quantized symmetrically with a narrow range (Jacob et al. 2018,
section 2.1; Krishnamoorthi 2018, on quantizer design): for ``bits`` bits the grid is
``q·scale`` with integer ``q ∈ [−(2^(bits−1) − 1), 2^(bits−1) − 1]`` (±127 at
8 bits) and ``scale = max|w| / (2^(bits−1) − 1)``, per output channel or for
the whole tensor; zero is exact and the grid is what int8 kernels store
(LiteRT and ONNX Runtime both want symmetric int8 weights).

Activations are quantized asymmetrically to 8 bits over a range
``[range_min, range_max]`` that follows the data as a moving average. The
range is *nudged* as TensorFlow's ``FakeQuantWithMinMaxVars`` does, so that
0.0 is a grid point (a zero-padded position must stay exactly zero):
``scale = (max − min)/(2^bits − 1)``, the zero point ``round(−min/scale)``
clamped into ``[0, 2^bits − 1]``, then ``min`` and ``max`` moved to the grid
of that zero point. `nudged_range` is that arithmetic for exporters.

Rounding and gradients: a value is rounded half up on the shifted grid
(``floor((x − min)/scale + 0.5)``, TensorFlow's rule); the gradient is the
straight-through estimator, passed unchanged inside the range and zero
outside it (the clamp), as TensorFlow's FakeQuant gradient is.

How the math becomes graph operations (the *lowering*) matters for
exporters, not for training: on TensorFlow the default ``"fake_quant"``
lowering emits ``FakeQuantWithMinMaxVars`` / ``FakeQuantWithMinMaxVarsPerChannel``,
which the LiteRT converter turns into int8 kernels; inside
``with lowering("qdq"):`` weights are emitted as their FakeQuant grid followed
by ``tf.raw_ops.QuantizeAndDequantizeV3`` with an ``axis`` and the 8-bit range
``±127·scale`` (symmetric, which tf2onnx turns into
``QuantizeLinear``/``DequantizeLinear`` whose integers are exactly the grid's
at any bits; tf2onnx would constant-fold a FakeQuant of a constant weight into
float weights, and it writes any ``QuantizeAndDequantizeV3`` with the scale
``max/127``), while activations keep ``FakeQuantWithMinMaxVars`` over their
nudged range (asymmetric, which tf2onnx converts to a
``QuantizeLinear``/``DequantizeLinear`` pair with a zero point; it refuses a
range that does not hold 0, and ``QuantizeAndDequantizeV3`` has no zero point). ``"ops"`` is the portable
`keras.ops` form, the only one on JAX and PyTorch; all three agree to the
float32 rounding of the grid's last multiply.

The per-channel axis is always the last one: a kernel whose output channels
are not last (a depthwise kernel ``(*k, in, mult)``) is reshaped before it
is quantized, never after (LiteRT requires it; Keras's own non-TensorFlow
fake-quant broadcasts per-channel ranges against the last axis anyway).

`weight_grid` returns the integer grid a layer uses in inference, which an
exporter compares with the integers in the file it writes.

The protocol (what `kerasbn.qat.layers` implements and exporters read,
without importing ``qat/``):

* a layer with weight fake-quant has ``weight_grid(name=None)`` (this
  module's `weight_grid` of itself), ``weight_bits``, ``per_channel``,
  ``quantized_kernel(name=None)`` (the float kernel in its quantization
  layout, before fake-quant, with bits and per_channel), ``folded_bias()``
  (the float bias of its inference form, or ``None``), ``layer`` (the wrapped
  original Keras layer: strides, padding…) and ``activation_quantizer`` (the
  quantizer between a separable layer's two stages, else ``None``);
* an activation quantizer has ``nudged_range()`` (``(min, max, scale)`` as
  the fake-quant uses them), ``bits``, ``range_min`` and ``range_max``.

`is_weight_quantized` and `is_activation_quantizer` test for them;
`is_quantization_aware` says whether a model has any.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

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

    Examples:
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


def weight_levels(bits: int) -> int:
    """The largest integer of a symmetric narrow-range ``bits``-bit grid (127 at 8 bits)."""
    return 2 ** (bits - 1) - 1


def _straight_through(x, clamped, quantized):
    # Forward: the quantized value; backward: the gradient of the clamp
    # (1 inside the range, 0 outside), TensorFlow's FakeQuant gradient.
    return clamped + ops.stop_gradient(quantized - clamped)


def weight_scale(w, bits: int, per_channel: bool):
    """``max|w| / (2^(bits−1) − 1)`` per last-axis channel (or one scalar), never 0.

    A channel of zeros gets the scale of a tiny range, so it quantizes to
    zeros instead of dividing by zero.
    """
    a = ops.abs(w)
    if per_channel:
        a = ops.max(ops.reshape(a, (-1, ops.shape(w)[-1])), axis=0)
    else:
        a = ops.max(a)
    tiny = np.finfo(np.float32).tiny * weight_levels(bits)
    return ops.maximum(a, tiny) / weight_levels(bits)


def fake_quant_weight(w, bits: int, per_channel: bool):
    """``w`` on its symmetric narrow-range grid: per last-axis channel, or per tensor.

    The range is ``±max|w|`` of the weight itself (no moving average: weights
    change slowly and the grid must cover them exactly).
    """
    w = ops.convert_to_tensor(w)
    scale = ops.stop_gradient(weight_scale(w, bits, per_channel))
    mode = current_lowering()
    if mode != "ops":
        return _tf_weight(w, scale, bits, per_channel, mode)
    n = weight_levels(bits)
    clamped = ops.clip(w, -n * scale, n * scale)
    # floor(x + 0.5): TensorFlow's round-half-up, so "ops" matches "fake_quant".
    q = ops.floor(clamped / scale + 0.5)
    return _straight_through(w, clamped, q * scale)


def _tf_weight(w, scale, bits: int, per_channel: bool, mode: str):
    import tensorflow as tf

    hi = scale * weight_levels(bits)
    if mode == "qdq":
        # tf2onnx writes QuantizeAndDequantizeV3 as a QuantizeLinear of scale max/127 whatever num_bits
        # says, which rounds the float weight half to even: it gets the grid itself (the FakeQuant of w)
        # as an 8-bit range ±127·scale instead, so the integers it computes are the grid's, at any bits.
        grid = _tf_weight(w, scale, bits, per_channel, "fake_quant")
        return tf.raw_ops.QuantizeAndDequantizeV3(
            input=grid,
            input_min=-127.0 * scale,
            input_max=127.0 * scale,
            num_bits=8,
            signed_input=True,
            range_given=True,
            narrow_range=True,
            axis=len(w.shape) - 1 if per_channel else -1,
        )
    if per_channel:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(w, -hi, hi, num_bits=bits, narrow_range=True)
    return tf.quantization.fake_quant_with_min_max_vars(w, -hi, hi, num_bits=bits, narrow_range=True)


def nudged_range(range_min, range_max, bits: int = 8):
    """TensorFlow's nudge of an activation range: ``(nudged_min, nudged_max, scale)``.

    Works on NumPy values and on tensors alike. The zero point is
    ``round(−min/scale)`` (half away from zero, as C's ``round``), clamped into
    ``[0, 2^bits − 1]``, so a range that excludes zero is shifted (not widened)
    to end at zero; an int8 exporter's zero point is that minus ``2^(bits−1)``.
    """
    top = float(2**bits - 1)
    lo = ops.convert_to_tensor(range_min, "float32")
    # A collapsed range still needs a non-zero scale.
    hi = ops.maximum(ops.convert_to_tensor(range_max, "float32"), lo + 1e-6)
    scale = (hi - lo) / top
    zero_from_min = -lo / scale
    zero = ops.clip(ops.sign(zero_from_min) * ops.floor(ops.abs(zero_from_min) + 0.5), 0.0, top)
    return -zero * scale, (top - zero) * scale, scale


def zero_point(range_min, range_max, bits: int = 8) -> int:
    """The unsigned zero point (``0 … 2^bits − 1``) of an activation range, as `nudged_range` rounds it."""
    lo, _, scale = nudged_range(np.float32(range_min), np.float32(range_max), bits)
    return int(np.rint(-np.asarray(lo, np.float64) / np.asarray(scale, np.float64)))


def fake_quant_activation(x, range_min, range_max, bits: int = 8):
    """``x`` on the nudged asymmetric ``bits``-bit grid of ``[range_min, range_max]``."""
    mode = current_lowering()
    if mode != "ops":
        import tensorflow as tf

        if mode == "qdq":
            # tf2onnx takes the zero point as round(−min/scale) unnudged and refuses one outside
            # [0, 255] (a range above zero): it gets the nudged range, the same grid, which holds 0.
            range_min, range_max, _ = nudged_range(range_min, range_max, bits)
        return tf.quantization.fake_quant_with_min_max_vars(x, range_min, range_max, num_bits=bits)
    lo, hi, scale = nudged_range(range_min, range_max, bits)
    clamped = ops.clip(x, lo, hi)
    q = ops.floor((clamped - lo) / scale + 0.5)
    return _straight_through(x, clamped, q * scale + lo)


def weight_grid(layer: Any, name: str | None = None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """The integer weight grid a quantization-aware layer uses in inference.

    Args:
        layer: A layer with weight fake-quant (the protocol above).
        name: Which kernel: ``None`` for the main one (the folded kernel of a
            fused layer, the pointwise kernel of a separable one),
            ``"depthwise_kernel"`` for a separable layer's depthwise stage.

    Returns:
        ``(q, scale, axis)``: ``q`` the integers (int32) in the layout the
        quantizer sees (the kernel's shape, a depthwise kernel ``(*k, in, mult)``
        reshaped to ``(*k, in·mult)``); ``scale`` float32, one per channel of
        ``q``'s ``axis``, or a 0-d array for per-tensor (then ``axis`` is
        ``None``). The layer's fake-quantized kernel in that layout is
        ``q·scale`` up to float32 rounding of the product (the integers are
        exact: they are read back from the fake-quant the layer runs).

    Examples:
        >>> import keras
        >>> from kerasbn.ops import fake_quant
        >>> from kerasbn.qat import layers
        >>> conv = layers.QuantizedWeights(keras.layers.Conv2D(2, 1), weight_bits=8)
        >>> _ = conv(keras.ops.ones((1, 2, 2, 3)))
        >>> q, scale, axis = fake_quant.weight_grid(conv)
        >>> q.shape, scale.shape, axis, int(abs(q).max())
        ((1, 1, 3, 2), (2,), 3, 127)
    """
    kernel, bits, per_channel = layer.quantized_kernel(name)
    kernel = np.asarray(ops.convert_to_numpy(kernel), np.float32)
    scale = np.asarray(ops.convert_to_numpy(weight_scale(kernel, bits, per_channel)), np.float32)
    fq = np.asarray(ops.convert_to_numpy(fake_quant_weight(kernel, bits, per_channel)), np.float64)
    q = np.rint(fq / scale.astype(np.float64)).astype(np.int32)
    return q, scale, (kernel.ndim - 1 if per_channel else None)


def is_weight_quantized(layer: Any) -> bool:
    """The layer implements the weight fake-quant protocol."""
    return callable(getattr(layer, "weight_grid", None)) and hasattr(layer, "weight_bits")


def is_activation_quantizer(layer: Any) -> bool:
    """The layer implements the activation-quantizer protocol."""
    return callable(getattr(layer, "nudged_range", None)) and hasattr(layer, "range_min")


def is_quantization_aware(model: Any) -> bool:
    """``model`` has any layer of the protocol (at any depth): an int8 export should read its grids."""
    return any(
        is_weight_quantized(layer) or is_activation_quantizer(layer)
        for layer in model._flatten_layers(include_self=False, recursive=True)
    )
