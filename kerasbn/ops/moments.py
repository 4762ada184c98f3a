"""Batch statistics that stay exact when the data carry a large offset.

The naive ``E[x²] − E[x]²`` in float32 loses every significant digit of the
variance once ``|mean| ≫ std`` (at an offset of 1e4 the square of the mean
eats all 24 bits), and even a two-pass ``mean((x − mean)²)`` is only as good
as the float32 mean, which is off by half an ulp of the offset. Both errors go
away when the data are shifted by one of their own values first: ``x − x₀`` is
exact in float32 for values within a factor of two of each other (Sterbenz),
and the shifted sums are of the order of the spread, not of the offset
(Chan, Golub & LeVeque 1983). Keeping the mean as the pair ``shift + delta``
lets the layer normalize as ``((x − shift) − delta)·a + β`` without ever
forming the rounded mean.

What is left is the rounding of the sums themselves; `kerasbn.ops.reduce`
arranges them per backend so that they stay exact to float32 rounding of the
result (TensorFlow's own reductions are nearly sequential).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from keras import backend, ops

from kerasbn.ops import distributed
from kerasbn.ops.reduce import sums


@dataclass(frozen=True)
class Moments:
    """Per-feature batch statistics, broadcastable against the input.

    Attributes:
        shift: One sample value per feature; ``mean = shift + delta``.
        delta: Mean of ``x − shift``.
        variance: The biased batch variance ``σ²_B`` (never negative).
        count: Number of values reduced per feature, ``m``.
    """

    shift: Any
    delta: Any
    variance: Any
    count: Any

    @property
    def mean(self):
        return self.shift + self.delta


def static_count(shape: Sequence[int | None], axes: Sequence[int]) -> int | None:
    """``m`` when every reduced dimension is known at trace time, else None."""
    dims = [shape[a] for a in axes]
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def _dynamic_count(x, axes: Sequence[int], dtype):
    m = static_count(x.shape, axes)
    if m is not None:
        return ops.convert_to_tensor(float(m), dtype=dtype)
    shape = ops.shape(x)
    count = ops.convert_to_tensor(1.0, dtype=dtype)
    for a in axes:
        count = count * ops.cast(shape[a], dtype)
    return count


# Values per feature in the sample whose mean is the shift: the shift then
# lies within about σ/8 of the batch mean for independent data, and the
# sample is a negligible read (64 values per feature) next to the batch.
SAMPLE = 64


def _sample(x, axes: Sequence[int]):
    """About `SAMPLE` values per feature, strided evenly over the reduced axes.

    Spread over the whole batch rather than taken from its first rows: the
    borders of a feature map or the first sequence steps are often not
    typical of the rest.
    """
    per_axis = max(2, math.ceil(SAMPLE ** (1.0 / max(len(axes), 1))))
    index = []
    for a, n in enumerate(x.shape):
        if a not in axes:
            index.append(slice(None))
        elif n is None:
            index.append(slice(None, None, ops.maximum(ops.shape(x)[a] // per_axis, 1)))
        else:
            index.append(slice(None, None, max(n // per_axis, 1)))
    return x[tuple(index)]


def sample_mean(x, axes: Sequence[int], mask=None):
    """A float32 estimate of the per-feature mean from a strided sample (see `SAMPLE`).

    Computed as ``s₀ + mean(s − s₀)`` around the sample's first value ``s₀``
    so that the estimate is good to rounding at the scale of the spread,
    whatever the offset. With a mask the kept values of the sample are
    averaged; where the sample keeps none, all of it is.
    """
    s = _sample(x, axes)
    ndim = len(x.shape)
    first = s[tuple(slice(0, 1) if a in axes else slice(None) for a in range(ndim))]
    d = s - first
    mean = ops.mean(d, axis=axes, keepdims=True)
    if mask is not None:
        w = ops.cast(_sample(ops.broadcast_to(mask, ops.shape(x)), axes), s.dtype)
        kept = ops.sum(w, axis=axes, keepdims=True)
        weighted = ops.sum(d * w, axis=axes, keepdims=True) / ops.maximum(kept, 1.0)
        mean = ops.where(kept > 0, weighted, mean)
    # A strided slice with a step known only at run time loses the static
    # rank on TensorFlow; the keepdims shape is known but for a kept batch axis.
    keep = [1 if a in axes else (-1 if n is None else n) for a, n in enumerate(x.shape)]
    return ops.reshape(first + mean, keep)


def moments(x, axes: Sequence[int], mask=None, synchronized: bool = False) -> Moments:
    """Shifted one-pass batch moments of a float32 (or wider) tensor.

    Args:
        x: Input tensor.
        axes: Axes to reduce over (every axis that is not a feature axis).
        mask: Optional weights broadcastable to ``x`` (1 keeps a value, 0
            drops it).
        synchronized: Reduce over all replicas of a `tf.distribute` strategy.

    Returns:
        A `Moments` with every field shaped like ``x`` reduced with keepdims.
    """
    axes = tuple(axes)
    shift = ops.stop_gradient(sample_mean(x, axes, mask))
    if backend.backend() == "jax":
        # XLA fuses the sample into each consumer, and a fusion that reads x
        # through it cannot write its output over x. Where a loop carries x
        # (`lax.fori_loop`, `scan`), ∂/∂x then takes a copy per step.
        # Materializing the per-feature shift keeps the big fusions
        # elementwise.
        from jax import lax

        shift = lax.optimization_barrier(shift)
    d = x - shift
    if mask is None:
        count = _dynamic_count(x, axes, "float64" if backend.backend() == "tensorflow" else x.dtype)
    else:
        w = ops.cast(ops.broadcast_to(mask, ops.shape(x)), x.dtype)
        d = d * w
        (count,) = sums([w], axes)
    s1, s2 = sums([d, d * d], axes)
    if synchronized:
        shift, s1, s2, count = distributed.all_reduce_moments(shift, s1, s2, count)
    safe = ops.maximum(count, 1.0)
    delta = s1 / safe
    variance = ops.maximum(s2 / safe - delta * delta, 0.0)
    return Moments(
        shift=shift,
        delta=ops.cast(delta, x.dtype),
        variance=ops.cast(variance, x.dtype),
        count=ops.cast(count, x.dtype),
    )
