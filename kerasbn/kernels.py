"""The fold arithmetic, one small function per kernel layout.

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
========================  ============================  ==========================

Weights are passed by their Keras 3 names: ``kernel`` (Dense, ConvND,
DepthwiseConvND, ConvNDTranspose), ``depthwise_kernel`` and
``pointwise_kernel`` (SeparableConvND), ``bias``.

Backward fold (BN after the layer): ``W' = W·s`` along the output-channel
axis, ``b' = (b − μ)·s + β = b·s + t``. Forward fold (BN before the layer):
``W' = W·s`` along the input-channel axis, ``b' = b + Σ W·t`` over the
kernel and input axes. All arithmetic is float64; callers cast back to each
variable's dtype.
"""

from __future__ import annotations

import numpy as np

Weights = dict[str, np.ndarray]


def bn_affine(weights: Weights, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` of an inference BN from its weights (``gamma``/``beta`` optional)."""
    mean = np.asarray(weights["moving_mean"], np.float64)
    var = np.asarray(weights["moving_variance"], np.float64)
    gamma = np.asarray(weights.get("gamma", np.ones_like(mean)), np.float64)
    beta = np.asarray(weights.get("beta", np.zeros_like(mean)), np.float64)
    s = gamma / np.sqrt(var + epsilon)
    return s, beta - mean * s


def _bias(weights: Weights, n: int) -> np.ndarray:
    return np.asarray(weights["bias"], np.float64) if "bias" in weights else np.zeros(n)


def backward(kind: str, weights: Weights, s: np.ndarray, t: np.ndarray) -> Weights:
    """Fold ``y ↦ s·y + t`` applied after a layer into its weights.

    Args:
        kind: ``"dense"``, ``"conv"``, ``"depthwise"``, ``"separable"`` or ``"transpose"``.
        weights: The layer's weights by short name, float64 (``bias`` may be absent).
        s, t: Per-output-channel scale and shift.

    Returns:
        The changed weights, ``bias`` always included.
    """
    out = dict(weights)
    if kind in ("dense", "conv"):
        out["kernel"] = weights["kernel"] * s
    elif kind == "depthwise":
        k = weights["kernel"]
        out["kernel"] = k * s.reshape(k.shape[-2:])
    elif kind == "separable":
        out["pointwise_kernel"] = weights["pointwise_kernel"] * s
    elif kind == "transpose":
        out["kernel"] = weights["kernel"] * s[:, None]
    else:
        raise ValueError(f"Unknown kernel layout {kind!r}.")
    out["bias"] = _bias(weights, s.size) * s + t
    return out


def _grouped(v: np.ndarray, in_per_group: int, out: int) -> np.ndarray:
    """``(in/groups, out)`` matrix with the input-channel value each kernel entry meets."""
    groups = v.size // in_per_group
    per_out = out // groups
    group_of_out = np.arange(out) // per_out
    return v.reshape(groups, in_per_group)[group_of_out].T


def forward(kind: str, weights: Weights, s: np.ndarray, t: np.ndarray) -> Weights:
    """Fold ``x ↦ s·x + t`` applied before a layer into its weights.

    Exact only when the layer never reads a zero-padded position (checked in
    `kerasbn.rules`). For ``"conv"`` the number of groups is read from the
    kernel's input-channel dimension and ``s.size``.

    Returns:
        The changed weights, ``bias`` always included.
    """
    out = dict(weights)
    if kind == "dense":
        w = weights["kernel"]
        out["kernel"] = w * s[:, None]
        shift = t @ w
    elif kind == "conv":
        w = weights["kernel"]
        spatial = tuple(range(w.ndim - 2))
        scale = _grouped(s, w.shape[-2], w.shape[-1])
        offset = _grouped(t, w.shape[-2], w.shape[-1])
        out["kernel"] = w * scale
        shift = (w * offset).sum(axis=spatial + (w.ndim - 2,))
    elif kind == "depthwise":
        w = weights["kernel"]
        spatial = tuple(range(w.ndim - 2))
        out["kernel"] = w * s[:, None]
        shift = (w * t[:, None]).sum(axis=spatial).reshape(-1)
    elif kind == "separable":
        w = weights["depthwise_kernel"]
        p = weights["pointwise_kernel"]
        spatial = tuple(range(w.ndim - 2))
        out["depthwise_kernel"] = w * s[:, None]
        # The constant the depthwise stage adds per intermediate channel,
        # carried through the pointwise kernel into the output bias.
        inner = (w * t[:, None]).sum(axis=spatial).reshape(-1)
        shift = inner @ p.reshape(p.shape[-2], p.shape[-1])
    else:
        raise ValueError(f"No exact forward fold for kernel layout {kind!r}.")
    out["bias"] = _bias(weights, shift.size) + shift
    return out


def tile_for_flatten(
    v: np.ndarray, shape: tuple[int, ...], axis: int, channels_first: bool
) -> np.ndarray:
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
