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


def first_sample(x, axes: Sequence[int]):
    """The value at index 0 of every reduced axis, kept as a broadcastable slice."""
    start = [0] * len(x.shape)
    size = [1 if a in axes else d for a, d in enumerate(x.shape)]
    sample = ops.slice(x, start, size)
    if backend.backend() == "jax":
        # XLA fuses the slice into each consumer, and a fusion that reads x
        # through it cannot write its output over x. Where a loop carries x
        # (`lax.fori_loop`, `scan`), ∂/∂x then takes a copy per step: on an
        # H200, 5.9 of the 51 µs of a bfloat16 (32, 56, 56, 64) training step.
        # Materializing the per-feature sample keeps the big fusions
        # elementwise.
        from jax import lax

        sample = lax.optimization_barrier(sample)
    return sample


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
    shift = ops.stop_gradient(first_sample(x, axes))
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
