"""Float64 NumPy reference of Ioffe & Szegedy (2015), written from the paper.

Algorithm 1 (the batch-normalizing transform), Algorithm 2 (inference with
population statistics) and the paper's gradient formulas (§3). These are the
oracle of the layer tests: nothing here imports kerasbn.
"""

from __future__ import annotations

import numpy as np


def reduction_axes(ndim: int, feature_axes) -> tuple[int, ...]:
    features = {a % ndim for a in np.atleast_1d(feature_axes)}
    return tuple(a for a in range(ndim) if a not in features)


def algorithm1(x, feature_axes, gamma=None, beta=None, eps=1e-3, mask=None):
    """Training-mode BN. Returns (y, μ_B, σ²_B, m) with statistics kept broadcastable."""
    x = np.asarray(x, np.float64)
    axes = reduction_axes(x.ndim, feature_axes)
    w = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask, np.float64)[..., None], x.shape)
    m = w.sum(axis=axes, keepdims=True)
    mu = (w * x).sum(axis=axes, keepdims=True) / m
    var = (w * (x - mu) ** 2).sum(axis=axes, keepdims=True) / m
    xhat = (x - mu) / np.sqrt(var + eps)
    y = xhat * (1.0 if gamma is None else broadcast(gamma, x.ndim, feature_axes))
    y = y + (0.0 if beta is None else broadcast(beta, x.ndim, feature_axes))
    return y, mu, var, m


def broadcast(v, ndim, feature_axes):
    features = sorted({a % ndim for a in np.atleast_1d(feature_axes)})
    shape = [1] * ndim
    for a, d in zip(features, np.shape(v), strict=False):
        shape[a] = d
    return np.reshape(np.asarray(v, np.float64), shape)


def moving_update(old_mean, old_var, mu, var, m, momentum, unbiased=True, step=0):
    """Algorithm 2's population statistics, one training batch at a time.

    ``momentum=None`` is the exact average over all batches seen (``step`` is
    the number of batches already averaged); otherwise Keras's exponential
    average ``momentum·old + (1 − momentum)·batch``.
    """
    if unbiased:
        var = var * m / (m - 1)
    if momentum is None:
        return old_mean + (mu - old_mean) / (step + 1), old_var + (var - old_var) / (step + 1)
    return momentum * old_mean + (1 - momentum) * mu, momentum * old_var + (1 - momentum) * var


def algorithm2(x, feature_axes, mean, var, gamma=None, beta=None, eps=1e-3):
    """Inference-mode BN with population statistics."""
    x = np.asarray(x, np.float64)
    y = (x - broadcast(mean, x.ndim, feature_axes)) / np.sqrt(broadcast(var, x.ndim, feature_axes) + eps)
    y = y * (1.0 if gamma is None else broadcast(gamma, x.ndim, feature_axes))
    return y + (0.0 if beta is None else broadcast(beta, x.ndim, feature_axes))


def backward(x, dy, feature_axes, gamma=None, eps=1e-3):
    """The paper's gradients of Algorithm 1: (dx, dγ, dβ)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = reduction_axes(x.ndim, feature_axes)
    _, mu, var, m = algorithm1(x, feature_axes, eps=eps)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * inv
    g = 1.0 if gamma is None else broadcast(gamma, x.ndim, feature_axes)
    dbeta = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * xhat).sum(axis=axes, keepdims=True)
    dx = g * inv / m * (m * dy - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


# float32's unit roundoff: the spacing of float32 numbers relative to their size is 2u.
UNIT = 2.0**-24
# Relative error allowed in a float32 batch variance of well-conditioned data:
# what a float32 two-pass computation with pairwise sums reaches, ≈ 4.8e-7.
# Blocked float32 sums of at most 32 values (then the partial sums) round by
# about √(log₂ m)·u at random; 8 units leave room for the rounding of the
# stored float32 result (u/2) and of the squares (u each, averaged out).
VARIANCE_UNITS = 8


def variance_tolerance(mu, var, shift=None):
    """Relative error bound of a float32 batch variance computed around ``shift``.

    The shifted form ``Σd²/m − (Σd/m)²`` with ``d = x − shift`` magnifies the
    rounding of the sums by its condition number ``κ = 1 + (μ − shift)²/σ²``:
    the bound is ``VARIANCE_UNITS·u·κ`` (κ = 1 for a two-pass computation or
    an unknown shift close to the mean).
    """
    var = np.asarray(var, np.float64)
    if shift is None:
        return VARIANCE_UNITS * UNIT * np.ones_like(var)
    offset2 = (np.asarray(mu, np.float64) - shift) ** 2
    # A constant feature (σ = 0) has no relative error to bound: κ = 1 there.
    kappa = 1.0 + np.divide(offset2, var, out=np.zeros_like(offset2 * var), where=var > 0)
    return VARIANCE_UNITS * UNIT * kappa
