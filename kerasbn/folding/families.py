"""One place per layer family: its channel axes, its backward and forward fold.

In inference a BN is the affine map ``x̂ = s·x + t`` per channel with
``s = γ/√(var + ε)`` and ``t = β − μ·s``. Keras 3 kernel layouts do not
depend on ``data_format``:

========================  ============================  ==========================
layer                     kernel shape                  output-channel axis
========================  ============================  ==========================
Dense                     ``(in, out)``                 last
ConvND (``groups``)       ``(*k, in/groups, out)``      last
DepthwiseConvND           ``(*k, in, multiplier)``      ``(in, mult)`` → ``in·mult + j``
SeparableConvND           pointwise ``(*1, in·mult, out)``  last of the pointwise kernel
ConvNDTranspose           ``(*k, out, in)``             second to last
TimeDistributed(layer)    the wrapped layer's           the wrapped layer's, one axis further
========================  ============================  ==========================

Backward fold (BN after the layer): ``W' = W·s`` along the output-channel
axis, ``b' = (b − μ)·s + β = b·s + t``. Forward fold (BN before the layer):
``W' = W·s`` along the input-channel axis, ``b' = b + Σ W·t`` over the
kernel and input axes; exact only where the layer never reads a zero-padded
position (a padded zero would be ``0`` instead of the BN's ``s·0 + t = t``).

Weights are passed by their Keras 3 names (``kernel``, ``depthwise_kernel``,
``pointwise_kernel``, ``bias``), as float64; callers cast back to each
variable's dtype.

To teach the fold engine a new layer type, add a `Family` subclass here and
list it in `FAMILIES`: nothing else in the engine names layer classes.
"""

from __future__ import annotations

import keras
import numpy as np

from kerasbn.layers import BatchNormalization as KerasbnBatchNormalization

Weights = dict[str, np.ndarray]


class Family:
    """A kernel layout: which layers have it and how a BN folds into them.

    Attributes:
        name: Short name for messages and reports.
        layers: The Keras layer classes of the family (subclasses match too).
        forward_exact_always: A forward fold never meets zero padding (Dense).
        forward_foldable: A BN before the layer can fold into it at all.
    """

    name: str = ""
    layers: tuple[type, ...] = ()
    forward_exact_always: bool = False
    forward_foldable: bool = True

    def channel_axis(self, layer: keras.layers.Layer, rank: int) -> int:
        """The (non-negative) channel axis of the layer's input and output of ``rank``."""
        if getattr(layer, "data_format", "channels_last") == "channels_first":
            return 1
        return rank - 1

    def backward(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> Weights:
        """Fold ``y ↦ s·y + t`` applied after the layer; ``bias`` always included in the result."""
        out = dict(weights)
        out.update(self._scale_outputs(weights, s))
        out["bias"] = _bias(weights, s.size) * s + t
        return out

    def forward(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> Weights:
        """Fold ``x ↦ s·x + t`` applied before the layer; ``bias`` always included in the result."""
        out = dict(weights)
        changed, shift = self._scale_inputs(weights, s, t)
        out.update(changed)
        out["bias"] = _bias(weights, shift.size) + shift
        return out

    def forward_inexact(self, layer: keras.layers.Layer, described: str) -> str | None:
        """Why a forward fold into ``layer`` (``described`` in messages) is not exact, or ``None``."""
        if self.forward_exact_always:
            return None
        if layer.padding != "valid" and any(k != 1 for k in layer.kernel_size):
            return f"zero padding ('{layer.padding}') in {described} makes a forward fold inexact"
        return None

    def output_columns(self, name: str, kernel: np.ndarray) -> np.ndarray:
        """Kernel ``name`` as a (taps, output channels) matrix: the columns per-channel int8 scales separately."""
        return kernel.reshape(-1, kernel.shape[-1])

    def _scale_outputs(self, weights: Weights, s: np.ndarray) -> Weights:
        raise NotImplementedError

    def _scale_inputs(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> tuple[Weights, np.ndarray]:
        raise ValueError(f"No exact forward fold for the {self.name!r} layout.")


class Dense(Family):
    name = "dense"
    layers = (keras.layers.Dense,)
    forward_exact_always = True

    def channel_axis(self, layer: keras.layers.Layer, rank: int) -> int:
        return rank - 1

    def _scale_outputs(self, weights: Weights, s: np.ndarray) -> Weights:
        return {"kernel": weights["kernel"] * s}

    def _scale_inputs(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> tuple[Weights, np.ndarray]:
        w = weights["kernel"]
        return {"kernel": w * s[:, None]}, t @ w


class Conv(Family):
    name = "conv"
    layers = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)

    def _scale_outputs(self, weights: Weights, s: np.ndarray) -> Weights:
        return {"kernel": weights["kernel"] * s}

    def _scale_inputs(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> tuple[Weights, np.ndarray]:
        # The number of groups follows from the kernel's input-channel
        # dimension and the BN's channel count.
        w = weights["kernel"]
        spatial = tuple(range(w.ndim - 2))
        scale = _grouped(s, w.shape[-2], w.shape[-1])
        offset = _grouped(t, w.shape[-2], w.shape[-1])
        return {"kernel": w * scale}, (w * offset).sum(axis=spatial + (w.ndim - 2,))


class DepthwiseConv(Family):
    name = "depthwise"
    layers = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

    def output_columns(self, name: str, kernel: np.ndarray) -> np.ndarray:
        # (*k, in, multiplier): output channel c·multiplier + j.
        return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])

    def _scale_outputs(self, weights: Weights, s: np.ndarray) -> Weights:
        k = weights["kernel"]
        return {"kernel": k * s.reshape(k.shape[-2:])}

    def _scale_inputs(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> tuple[Weights, np.ndarray]:
        w = weights["kernel"]
        spatial = tuple(range(w.ndim - 2))
        return {"kernel": w * s[:, None]}, (w * t[:, None]).sum(axis=spatial).reshape(-1)


class SeparableConv(Family):
    name = "separable"
    layers = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)

    def output_columns(self, name: str, kernel: np.ndarray) -> np.ndarray:
        if name == "depthwise_kernel":
            return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
        return kernel.reshape(-1, kernel.shape[-1])

    def _scale_outputs(self, weights: Weights, s: np.ndarray) -> Weights:
        return {"pointwise_kernel": weights["pointwise_kernel"] * s}

    def _scale_inputs(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> tuple[Weights, np.ndarray]:
        w = weights["depthwise_kernel"]
        p = weights["pointwise_kernel"]
        spatial = tuple(range(w.ndim - 2))
        # The constant the depthwise stage adds per intermediate channel,
        # carried through the pointwise kernel into the output bias.
        inner = (w * t[:, None]).sum(axis=spatial).reshape(-1)
        return {"depthwise_kernel": w * s[:, None]}, inner @ p.reshape(p.shape[-2], p.shape[-1])


class ConvTranspose(Family):
    name = "transpose"
    layers = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)

    def output_columns(self, name: str, kernel: np.ndarray) -> np.ndarray:
        # (*k, out, in): the output channels are second to last.
        return np.moveaxis(kernel, -2, -1).reshape(-1, kernel.shape[-2])

    def _scale_outputs(self, weights: Weights, s: np.ndarray) -> Weights:
        return {"kernel": weights["kernel"] * s[:, None]}

    forward_foldable = False

    def forward_inexact(self, layer: keras.layers.Layer, described: str) -> str | None:
        # Every output position sums a different number of taps near the
        # borders, so a constant input shift does not become a constant bias.
        return f"{described} after it sums fewer taps at the borders, so a forward fold is inexact"


class TimeDistributed(Family):
    """A `keras.layers.TimeDistributed` of a family's layer: the wrapped layer is the partner.

    The wrapper applies its layer to every step of axis 1 with the same
    weights, so a BN over the channel axis (one axis further than the wrapped
    layer's own) folds into those weights exactly as into the layer itself,
    in both directions and under the same padding rule. Its weights and
    config are the wrapped layer's (`unwrap`; `kerasbn.folding.rewrite` patches
    the wrapped layer's config).
    """

    layers = (keras.layers.TimeDistributed,)

    def __init__(self, inner: Family) -> None:
        self.inner = inner
        self.name = f"time_distributed({inner.name})"
        self.forward_exact_always = inner.forward_exact_always
        self.forward_foldable = inner.forward_foldable

    def channel_axis(self, layer: keras.layers.Layer, rank: int) -> int:
        return self.inner.channel_axis(layer.layer, rank - 1) + 1

    def backward(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> Weights:
        return self.inner.backward(weights, s, t)

    def forward(self, weights: Weights, s: np.ndarray, t: np.ndarray) -> Weights:
        return self.inner.forward(weights, s, t)

    def forward_inexact(self, layer: keras.layers.Layer, described: str) -> str | None:
        return self.inner.forward_inexact(layer.layer, described)

    def output_columns(self, name: str, kernel: np.ndarray) -> np.ndarray:
        return self.inner.output_columns(name, kernel)


FAMILIES: tuple[Family, ...] = (Dense(), Conv(), DepthwiseConv(), SeparableConv(), ConvTranspose())
_BY_CLASS: dict[type, Family] = {cls: family for family in FAMILIES for cls in family.layers}


def unwrap(layer: object) -> object:
    """The layer a `keras.layers.TimeDistributed` applies (through nested wrappers), else ``layer`` itself.

    Its attributes (``activation``, ``use_bias``, ``quantization_mode``...) are the partner's.
    """
    while isinstance(layer, keras.layers.TimeDistributed):
        layer = layer.layer
    return layer


def family_of(layer: object) -> Family | None:
    """The family of a linear layer (subclasses of a family's classes included; a `TimeDistributed`
    one of them), or ``None``."""
    if isinstance(layer, keras.layers.TimeDistributed):
        inner = family_of(layer.layer)
        return None if inner is None else TimeDistributed(inner)
    for cls in type(layer).__mro__:
        family = _BY_CLASS.get(cls)
        if family is not None:
            return family
    return None


def bn_affine(weights: Weights, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` of an inference BN from its weights (``gamma``/``beta`` optional)."""
    mean = np.asarray(weights["moving_mean"], np.float64)
    var = np.asarray(weights["moving_variance"], np.float64)
    gamma = np.asarray(weights.get("gamma", np.ones_like(mean)), np.float64)
    beta = np.asarray(weights.get("beta", np.zeros_like(mean)), np.float64)
    s = gamma / np.sqrt(var + epsilon)
    return s, beta - mean * s


def tile_for_flatten(v: np.ndarray, shape: tuple[int, ...], axis: int, channels_first: bool) -> np.ndarray:
    """Spread a per-channel vector over the positions a Flatten layer produces.

    Args:
        v: Per-channel values along ``axis``.
        shape: The Flatten input shape without the batch axis.
        axis: The BN axis, counted with the batch axis (so ``1`` is the first feature axis).
        channels_first: Flatten's ``data_format`` is ``"channels_first"`` (it
            moves the channel axis last before flattening).
    """
    view = [1] * len(shape)
    view[axis - 1] = v.size
    full = np.broadcast_to(v.reshape(view), shape)
    if channels_first and len(shape) > 1:
        full = np.moveaxis(full, 0, -1)
    return np.ascontiguousarray(full).reshape(-1)


def bias_into_mean(weights: Weights, bias: np.ndarray) -> Weights:
    """Move a redundant bias into the following BN: ``μ ← μ − b`` keeps ``BN(Wx + b) = BN'(Wx)``."""
    out = dict(weights)
    out["moving_mean"] = np.asarray(weights["moving_mean"], np.float64) - bias
    return out


def _bias(weights: Weights, n: int) -> np.ndarray:
    return np.asarray(weights["bias"], np.float64) if "bias" in weights else np.zeros(n)


def _grouped(v: np.ndarray, in_per_group: int, out: int) -> np.ndarray:
    """``(in/groups, out)`` matrix with the input-channel value each kernel entry meets."""
    groups = v.size // in_per_group
    per_out = out // groups
    group_of_out = np.arange(out) // per_out
    return v.reshape(groups, in_per_group)[group_of_out].T


def is_bn(layer: object) -> bool:
    """True for `keras.layers.BatchNormalization` and `kerasbn.BatchNormalization`."""
    return isinstance(layer, (keras.layers.BatchNormalization, KerasbnBatchNormalization))
