"""The training-mode normalization with the paper's hand-written gradient.

Autodiff through the shifted moments and the normalization costs a dozen
passes over the activations; the paper's closed form needs two reductions
and one elementwise pass:

    dβ = Σ dy,  dγ = Σ dy·x̂,  dx = γ/(m·σ)·(m·dy − dβ − x̂·dγ),
    σ = √(σ²_B + ε).

The statistics enter as stop-gradient inputs and the closed form accounts
for their dependence on ``x``. `normalize` writes it with
``keras.ops.custom_gradient`` around plain ops, for XLA (TF
``jit_compile=True``, JAX on any device) and any layout: the sums go
through the backend's arrangement (`kerasbn.ops.dispatch.sums`) and ``dx``
is one elementwise pass, with ``x̂`` recomputed from ``x`` rather than
stored. On TensorFlow outside XLA on CPU the layer runs the same contract
through the fused kernels instead (`kerasbn.ops.tensorflow.fused_normalize`).
Masks and renorm keep autodiff (see the layer).
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import ops

from kerasbn.ops import dispatch
from kerasbn.ops.moments import Moments


def normalize(x, stats: Moments, gamma, beta, epsilon: float, axes: Sequence[int], synchronized: bool = False):
    """``((x − shift) − delta)·γ/σ + β`` with the closed-form gradient.

    Args:
        x: Input of any float dtype; the arithmetic is in the statistics'
            dtype (float32 or wider) and ``∂/∂x`` comes back in ``x``'s dtype.
        stats: `kerasbn.ops.moments.Moments` of ``x`` over ``axes``.
        gamma: Scale broadcastable to ``x``, or None.
        beta: Offset broadcastable to ``x``, or None.
        epsilon: Added to the variance.
        axes: The reduced axes of ``x``.
        synchronized: The statistics are global across `tf.distribute`
            replicas, so are the sums in the gradient of ``x``.
    """
    axes = tuple(axes)
    shift = ops.stop_gradient(stats.shift)
    delta = ops.stop_gradient(stats.delta)
    inv = ops.stop_gradient(ops.rsqrt(stats.variance + epsilon))
    dtype = stats.variance.dtype
    count = ops.stop_gradient(ops.cast(stats.count, dtype))
    g = ops.ones_like(inv) if gamma is None else gamma
    b = ops.zeros_like(inv) if beta is None else beta

    @ops.custom_gradient
    def _normalize(x, g, b, shift, delta, inv, count):
        d = ops.cast(x, dtype) - shift
        a = inv * g
        y = (d - delta) * a + b

        def grad(*args, upstream=None):
            dy = ops.cast(args[0] if upstream is None else upstream, dtype)
            d = ops.cast(x, dtype) - shift
            # Σdy·x̂ = (Σdy·d − δ·Σdy)·inv rather than Σdy·(d − δ)·inv: with
            # more than one per-feature vector in the summand, XLA:CPU emits
            # the reduction loop in scalar code. δ is a fraction of σ (the
            # shift estimates the mean), so the difference loses no more
            # than the dx regrouping below.
            db, dd = dispatch.sums([dy, dy * d], axes, exact=False)
            dg = (dd - delta * db) * inv
            sum_db, sum_dg = dispatch.all_reduce_sums(db, dg) if synchronized else (db, dg)
            # dx = a·(dy − dβ/m − x̂·dγ/m) with x̂ = (d − δ)·inv, regrouped
            # into per-feature coefficients: one elementwise pass. d is a
            # few σ at most, so the regrouping is exact to rounding at the
            # scale of the spread, not of the offset.
            k2 = a * inv * sum_dg / count
            k0 = a * sum_db / count - k2 * delta
            dx = ops.cast(a * dy - k2 * d - k0, x.dtype)
            zero = [ops.zeros_like(t) for t in (shift, delta, inv, count)]
            return (dx, _reduce_to(dg, g), _reduce_to(db, b), *zero)

        return y, grad

    return _normalize(x, g, b, shift, delta, inv, count)


def _reduce_to(grad, like):
    """Sum ``grad`` over the axes that ``like`` broadcasts (ghost batches' groups)."""
    extra = [i for i, (n, k) in enumerate(zip(like.shape, grad.shape, strict=True)) if n == 1 and k != 1]
    return ops.sum(grad, axis=extra, keepdims=True) if extra else grad
