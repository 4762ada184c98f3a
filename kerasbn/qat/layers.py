"""The layers of a quantization-aware model: fused linear+BN, weight fake-quant, activation fake-quant.

A `kerasbn.qat.prepare`-d model is made of the original layers plus these:

* `ConvBatchNorm`, `DepthwiseConvBatchNorm`, `SeparableConvBatchNorm`,
  `DenseBatchNorm`: a linear layer and the BN after it, trained as the one
  layer the int8 graph will run (Jacob et al. 2018, section 3.2;
  Krishnamoorthi 2018 on batch normalization in QAT; PyTorch's ``ConvBn2d``). The kernel is
  folded with the *moving* statistics, ``W·γ/√(σ²_moving + ε)``, and
  fake-quantized; until the statistics are frozen the output is corrected to
  batch normalization with the batch statistics,
  ``y = γ·(z − μ_B)/√(σ²_B + ε) + β`` where ``z = conv(x, fq(W·s))/s + b``
  (equivalently the quantized output times ``σ_moving/σ_B`` plus a shift), and
  the moving statistics are updated with the BN's momentum. Once frozen (and
  always in inference) the layer is exactly the folded, quantized layer:
  ``conv(x, fq(W·s)) + (b − μ)·s + β``.
* `QuantizedWeights`: any other Dense/Conv/DepthwiseConv/SeparableConv with
  its kernel fake-quantized.
* `ActivationQuantizer`: an 8-bit asymmetric fake-quant with a moving-average
  range, placed where the int8 graph requantizes a tensor.

What an exporter reads (documented attributes, stable):

* every layer with weight fake-quant: ``weight_bits``, ``per_channel``,
  ``quantized_kernel(name)`` and `kerasbn.ops.fake_quant.weight_grid` for the
  integers; ``folded_bias()`` the float bias of the inference form;
  ``layer`` the wrapped original (its config: strides, padding…);
  ``activation_quantizer`` the `ActivationQuantizer` between the depthwise
  and pointwise stages of a separable layer (``None`` elsewhere).
* `ActivationQuantizer`: ``bits``, ``range_min``, ``range_max`` (variables),
  ``nudged_range()`` (the range and scale the fake-quant actually uses).

The per-channel axis of a weight grid is the last axis of the kernel in its
quantization layout (`kerasbn.ops.fake_quant.weight_grid`). Dense kernels are
always quantized per tensor: the LiteRT converter refuses per-channel
fake-quant on a fully connected kernel ("mismatched quantized axes").
"""

from __future__ import annotations

import keras
from keras import ops

from kerasbn.ops import fake_quant

_PACKAGE = "kerasbn.qat"


def _moving(shape, name, layer, initializer):
    return layer.add_weight(shape=shape, name=name, initializer=initializer, trainable=False, autocast=False)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ActivationQuantizer(keras.layers.Layer):
    """8-bit asymmetric fake quantization with a moving-average range.

    In training the range follows the batch: ``range ← momentum·range +
    (1 − momentum)·batch range`` (the first training batch, or the first
    calibration pass, sets it directly); in inference the stored range is used.
    The fake-quant itself is `kerasbn.ops.fake_quant.fake_quant_activation`.

    Args:
        bits: Bits of the activation grid (8 for int8 graphs).
        momentum: Momentum of the moving average of the range.
        **kwargs: Base layer keyword arguments (``name``…).

    Call arguments:
        inputs: Any float tensor.
        training: Python boolean: update the range from this batch.

    Reference:
        Jacob et al. 2018, "Quantization and Training of Neural Networks for
        Efficient Integer-Arithmetic-Only Inference", section 3.1.

    Examples:
        >>> import keras
        >>> from kerasbn.qat.layers import ActivationQuantizer
        >>> q = ActivationQuantizer()
        >>> y = q(keras.ops.convert_to_tensor([[-1.0, 0.0, 3.0]]), training=True)
        >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(q.nudged_range())[:2]]
        [-1.004, 2.996]
    """

    def __init__(self, bits: int = 8, momentum: float = 0.99, **kwargs):
        super().__init__(**kwargs)
        self.bits = int(bits)
        self.momentum = float(momentum)
        self.supports_masking = True
        # Set by `kerasbn.qat.prepare` while it runs calibration data (eagerly).
        self.calibrating = False

    def build(self, input_shape):
        self.range_min = _moving((), "range_min", self, "zeros")
        self.range_max = _moving((), "range_max", self, "zeros")
        self.initialized = _moving((), "initialized", self, "zeros")

    def call(self, inputs, training=False):
        x = ops.cast(inputs, "float32")
        lo, hi = self.range_min.value, self.range_max.value
        if self.calibrating:
            # Post-training calibration: the range covers every batch seen.
            seen = self.initialized.value > 0
            lo = ops.where(seen, ops.minimum(lo, ops.min(x)), ops.min(x))
            hi = ops.where(seen, ops.maximum(hi, ops.max(x)), ops.max(x))
            self._store(lo, hi)
        elif training:
            seen = self.initialized.value > 0
            batch_lo = ops.stop_gradient(ops.min(x))
            batch_hi = ops.stop_gradient(ops.max(x))
            m = self.momentum
            lo = ops.where(seen, m * lo + (1 - m) * batch_lo, batch_lo)
            hi = ops.where(seen, m * hi + (1 - m) * batch_hi, batch_hi)
            self._store(lo, hi)
        y = fake_quant.fake_quant_activation(x, lo, hi, self.bits)
        return ops.cast(y, inputs.dtype)

    def _store(self, lo, hi):
        self.range_min.assign(lo)
        self.range_max.assign(hi)
        self.initialized.assign(ops.ones((), "float32"))

    def nudged_range(self):
        """``(nudged_min, nudged_max, scale)`` the fake-quant uses (`kerasbn.ops.fake_quant.nudged_range`)."""
        return fake_quant.nudged_range(self.range_min.value, self.range_max.value, self.bits)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "momentum": self.momentum}


class _Kernels:
    """How one linear family runs and how its kernels are laid out for quantization."""

    def __init__(self, layer: keras.layers.Layer):
        self.layer = layer
        self.kind = _kind(layer)

    @property
    def main(self) -> str:
        """The kernel a following BN folds into."""
        return "pointwise_kernel" if self.kind == "separable" else "kernel"

    def variable(self, name: str):
        """The kernel's current value (a tensor: JAX ops reject Keras variables)."""
        return getattr(self.layer, name).value

    def to_grid(self, name: str, kernel):
        """The quantization layout: output channels on the last axis."""
        if self.kind == "depthwise" or name == "depthwise_kernel":
            shape = tuple(kernel.shape)
            return ops.reshape(kernel, shape[:-2] + (shape[-2] * shape[-1],))
        return kernel

    def from_grid(self, name: str, kernel):
        return ops.reshape(kernel, self.variable(name).shape)

    def scale_outputs(self, kernel, s):
        """``W·s`` along the output channels (the backward fold of `kerasbn.folding.families`)."""
        if self.kind == "depthwise":
            return kernel * ops.reshape(s, kernel.shape[-2:])
        return kernel * s

    def channels_axis(self, rank: int) -> int:
        if self.kind != "dense" and self.layer.data_format == "channels_first":
            return 1
        return rank - 1

    def run(self, x, kernels: dict, between=None):
        """The layer's linear map without bias or activation; ``between`` acts between separable stages."""
        layer = self.layer
        if self.kind == "dense":
            return ops.matmul(x, kernels["kernel"])
        padding = layer.padding
        if padding == "causal":
            x = ops.pad(x, layer._compute_causal_padding())
            padding = "valid"
        common = {"padding": padding, "dilation_rate": layer.dilation_rate, "data_format": layer.data_format}
        if self.kind == "conv":
            return ops.conv(x, kernels["kernel"], strides=list(layer.strides), **common)
        depthwise = kernels["depthwise_kernel" if self.kind == "separable" else "kernel"]
        y = ops.depthwise_conv(x, depthwise, strides=layer.strides, **common)
        if self.kind == "depthwise":
            return y
        if between is not None:
            y = between(y)
        return ops.conv(y, kernels["pointwise_kernel"], strides=1, padding="valid", data_format=layer.data_format)

    def bias_shape(self, rank: int, channels: int) -> tuple[int, ...]:
        shape = [1] * rank
        shape[self.channels_axis(rank)] = channels
        return tuple(shape)


def _kind(layer: keras.layers.Layer) -> str:
    if isinstance(layer, keras.layers.Dense):
        return "dense"
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        return "separable"
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return "depthwise"
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)) and not isinstance(
        layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
    ):
        return "conv"
    raise ValueError(f"Layer '{layer.name}' ({type(layer).__name__}) has no quantization-aware form.")


def supports(layer: keras.layers.Layer) -> bool:
    """True for the layer types that get weight fake-quant (Dense, ConvND, Depthwise, Separable)."""
    try:
        _kind(layer)
    except ValueError:
        return False
    return True


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantizedWeights(keras.layers.Wrapper):
    """A Dense/Conv/DepthwiseConv/SeparableConv layer whose kernels are fake-quantized.

    The wrapped layer keeps its weights, bias and activation; only the
    kernels it multiplies with are replaced by their symmetric narrow-range
    grid (`kerasbn.ops.fake_quant.fake_quant_weight`). A separable layer also
    fake-quantizes its depthwise output, which the int8 graph stores between
    its two stages.

    Args:
        layer: The Dense, Conv1D/2D/3D, DepthwiseConv1D/2D or SeparableConv1D/2D layer.
        weight_bits: Bits of the weight grid (2 to 8).
        per_channel: One scale per output channel (ignored for Dense, which
            is per tensor).
        **kwargs: Base layer keyword arguments (``name``…).

    Call arguments:
        inputs: The wrapped layer's input.
        training: Python boolean, passed to the activation quantizer.

    Reference:
        Jacob et al. 2018, section 3.1; Krishnamoorthi 2018, on quantization-aware training.
    """

    def __init__(self, layer, weight_bits: int = 8, per_channel: bool = True, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        if not 2 <= int(weight_bits) <= 8:
            raise ValueError(f"weight_bits must be between 2 and 8, got {weight_bits}.")
        self.kernels = _Kernels(layer)
        self.weight_bits = int(weight_bits)
        self.per_channel = bool(per_channel) and self.kernels.kind != "dense"
        self.activation_quantizer = (
            ActivationQuantizer(name=f"{self.name}_depthwise_output") if self.kernels.kind == "separable" else None
        )

    def build(self, input_shape):
        super().build(input_shape)
        if self.activation_quantizer is not None:
            self.activation_quantizer.build(None)

    def weight_grid(self, name: str | None = None):
        """``(q, scale, axis)``: the integer grid of a kernel (`kerasbn.ops.fake_quant.weight_grid`)."""
        return fake_quant.weight_grid(self, name)

    def quantized_kernel(self, name: str | None = None):
        """``(kernel in its quantization layout, bits, per_channel)`` before fake-quant."""
        name = name or self.kernels.main
        return self.kernels.to_grid(name, self.kernels.variable(name)), self.weight_bits, self.per_channel

    def _fake_quant(self, name: str, kernel):
        grid = self.kernels.to_grid(name, kernel)
        return self.kernels.from_grid(name, fake_quant.fake_quant_weight(grid, self.weight_bits, self.per_channel))

    def _quantized(self, training, fold=None):
        """The fake-quantized kernels (the main one first scaled by ``fold``, if given) and the separable hook."""
        names = ("depthwise_kernel", "pointwise_kernel") if self.kernels.kind == "separable" else ("kernel",)
        kernels = {}
        for n in names:
            kernel = self.kernels.variable(n)
            if fold is not None and n == self.kernels.main:
                kernel = self.kernels.scale_outputs(kernel, fold)
            kernels[n] = self._fake_quant(n, kernel)
        between = None
        if self.activation_quantizer is not None:

            def between(y):
                return self.activation_quantizer(y, training=training)

        return kernels, between

    def folded_bias(self):
        """The float bias of the inference form (``None`` without one)."""
        return self.layer.bias if self.layer.use_bias else None

    def call(self, inputs, training=False):
        kernels, between = self._quantized(training)
        y = self.kernels.run(inputs, kernels, between)
        if self.layer.use_bias:
            y = y + ops.reshape(self.layer.bias, self.kernels.bias_shape(len(y.shape), self.layer.bias.shape[0]))
        if self.layer.activation is not None:
            y = self.layer.activation(y)
        return y

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "weight_bits": self.weight_bits, "per_channel": self.per_channel}


class FusedBatchNorm(QuantizedWeights):
    """A linear layer and the BN after it, trained folded (see the module docstring).

    Args:
        layer: The linear layer (no activation; its bias, if any, is kept).
        epsilon: The BN's ε.
        momentum: The BN's momentum (Keras's convention: ``new = momentum·old + (1 − momentum)·batch``).
        center: The BN has ``beta``.
        scale: The BN has ``gamma``.
        unbiased: The moving variance tracks ``m/(m−1)·σ²_B`` (the paper,
            `kerasbn.BatchNormalization`'s default) instead of ``σ²_B`` (Keras).
        freeze_at: Training step from which the statistics are frozen (``-1``: not yet).
        weight_bits: As `QuantizedWeights`.
        per_channel: As `QuantizedWeights`.
        **kwargs: Base layer keyword arguments (``name``…).

    Call arguments:
        inputs: The linear layer's input.
        training: Python boolean: batch statistics with the correction and
            moving-statistics updates (until frozen), else the folded inference form.

    Weights (besides the wrapped layer's): ``gamma``, ``beta``,
    ``moving_mean``, ``moving_variance`` (as the BN's), and two non-trainable
    counters ``steps`` (training steps taken) and ``freeze_at``.

    Reference:
        Jacob et al. 2018, section 3.2; Krishnamoorthi 2018, on batch
        normalization in quantization-aware training (correction and freezing); PyTorch
        ``torch.ao.nn.intrinsic.qat.ConvBn2d``.
    """

    def __init__(
        self,
        layer,
        epsilon: float = 1e-3,
        momentum: float = 0.99,
        center: bool = True,
        scale: bool = True,
        unbiased: bool = False,
        freeze_at: int = -1,
        weight_bits: int = 8,
        per_channel: bool = True,
        **kwargs,
    ):
        super().__init__(layer, weight_bits=weight_bits, per_channel=per_channel, **kwargs)
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.center = bool(center)
        self.scale = bool(scale)
        self.unbiased = bool(unbiased)
        self.initial_freeze_at = int(freeze_at)

    def build(self, input_shape):
        super().build(input_shape)
        n = int(self.kernels.variable(self.kernels.main).shape[-1])
        if self.kernels.kind == "depthwise":
            n *= int(self.layer.kernel.shape[-2])
        self.gamma = self.add_weight(shape=(n,), name="gamma", initializer="ones", trainable=self.scale)
        self.beta = self.add_weight(shape=(n,), name="beta", initializer="zeros", trainable=self.center)
        self.moving_mean = _moving((n,), "moving_mean", self, "zeros")
        self.moving_variance = _moving((n,), "moving_variance", self, "ones")
        self.steps = self.add_weight(shape=(), name="steps", initializer="zeros", dtype="int32", trainable=False)
        self.freeze_at = self.add_weight(
            shape=(),
            name="freeze_at",
            initializer=keras.initializers.Constant(self.initial_freeze_at),
            dtype="int32",
            trainable=False,
        )

    def fold_scale(self):
        """``s = γ/√(σ²_moving + ε)`` per output channel."""
        return self.gamma.value / ops.sqrt(self.moving_variance.value + self.epsilon)

    def quantized_kernel(self, name: str | None = None):
        name = name or self.kernels.main
        kernel = self.kernels.variable(name)
        if name == self.kernels.main:
            kernel = self.kernels.scale_outputs(kernel, self.fold_scale())
        return self.kernels.to_grid(name, kernel), self.weight_bits, self.per_channel

    def _bias(self):
        return self.layer.bias.value if self.layer.use_bias else ops.zeros_like(self.moving_mean.value)

    def folded_bias(self):
        """``(b − μ_moving)·s + β``: the bias of the inference form."""
        return (self._bias() - self.moving_mean.value) * self.fold_scale() + self.beta.value

    def frozen(self):
        """True (as a tensor) once the statistics are frozen."""
        return ops.logical_and(self.freeze_at.value >= 0, self.steps.value >= self.freeze_at.value)

    def call(self, inputs, training=False):
        s = self.fold_scale()
        kernels, between = self._quantized(training, fold=s)
        y = self.kernels.run(inputs, kernels, between)
        shape = self.kernels.bias_shape(len(y.shape), s.shape[0])
        inference = y + ops.reshape(self.folded_bias(), shape)
        if not training:
            return inference
        # The output of the float layer (with the bias it had), seen through
        # the quantized kernel: conv(x, fq(W·s))/s + b.
        z = y / ops.reshape(s, shape) + ops.reshape(self._bias(), shape)
        axes = [a for a in range(len(y.shape)) if a != self.kernels.channels_axis(len(y.shape))]
        mean, var = ops.moments(z, axes=axes)
        corrected = (z - ops.reshape(mean, shape)) * ops.reshape(
            self.gamma.value / ops.sqrt(var + self.epsilon), shape
        ) + ops.reshape(self.beta.value, shape)
        frozen = self.frozen()
        self._update_statistics(ops.stop_gradient(mean), ops.stop_gradient(var), z, axes, frozen)
        self.steps.assign(self.steps.value + 1)
        return ops.where(frozen, inference, corrected)

    def _update_statistics(self, mean, var, z, axes, frozen):
        if self.unbiased:
            # The paper's m/(m − 1) with m the values reduced per channel.
            m = 1.0
            for a in axes:
                m = m * ops.cast(ops.shape(z)[a], "float32")
            var = var * m / ops.maximum(m - 1.0, 1.0)
        k = self.momentum
        old_mean, old_var = self.moving_mean.value, self.moving_variance.value
        self.moving_mean.assign(ops.where(frozen, old_mean, k * old_mean + (1 - k) * mean))
        self.moving_variance.assign(ops.where(frozen, old_var, k * old_var + (1 - k) * var))

    def get_config(self):
        return {
            **super().get_config(),
            "epsilon": self.epsilon,
            "momentum": self.momentum,
            "center": self.center,
            "scale": self.scale,
            "unbiased": self.unbiased,
            "freeze_at": self.initial_freeze_at,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvBatchNorm(FusedBatchNorm):
    __doc__ = (
        "Conv1D/2D/3D followed by BatchNormalization, trained folded and fake-quantized.\n"
        + (FusedBatchNorm.__doc__ or "").split("\n", 1)[1]
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DepthwiseConvBatchNorm(FusedBatchNorm):
    __doc__ = (
        "DepthwiseConv1D/2D followed by BatchNormalization, trained folded and fake-quantized.\n"
        + (FusedBatchNorm.__doc__ or "").split("\n", 1)[1]
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SeparableConvBatchNorm(FusedBatchNorm):
    __doc__ = (
        "SeparableConv1D/2D followed by BatchNormalization, the BN folded into the pointwise kernel.\n"
        + (FusedBatchNorm.__doc__ or "").split("\n", 1)[1]
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DenseBatchNorm(FusedBatchNorm):
    __doc__ = (
        "Dense followed by BatchNormalization, trained folded and fake-quantized (per tensor).\n"
        + (FusedBatchNorm.__doc__ or "").split("\n", 1)[1]
    )


FUSED = {
    "conv": ConvBatchNorm,
    "depthwise": DepthwiseConvBatchNorm,
    "separable": SeparableConvBatchNorm,
    "dense": DenseBatchNorm,
}


def fused_class(layer: keras.layers.Layer) -> type[FusedBatchNorm]:
    """The fused class for a linear layer (`supports` must hold)."""
    return FUSED[_kind(layer)]


def weight_quantized(model: keras.Model) -> list[QuantizedWeights]:
    """Every layer with weight fake-quant in ``model``, at any depth."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, QuantizedWeights)
    ]


def fused(model: keras.Model) -> list[FusedBatchNorm]:
    """Every fused linear+BN layer in ``model``, at any depth."""
    return [layer for layer in weight_quantized(model) if isinstance(layer, FusedBatchNorm)]


def activation_quantizers(model: keras.Model) -> list[ActivationQuantizer]:
    """Every activation quantizer in ``model`` (separable layers' inner ones included)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, ActivationQuantizer)
    ]
