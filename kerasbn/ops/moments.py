"""Batch statistics of Algorithm 1, exact at any offset, in one pass.

The naive ``E[x²] − E[x]²`` in float32 loses every significant digit of the
variance once ``|mean| ≫ std`` (at an offset of 1e4 the square of the mean
eats all 24 bits), and even a two-pass ``mean((x − mean)²)`` is only as good
as the float32 mean, which is off by half an ulp of the offset. Both errors go
away when the data are shifted by a value close to their mean first
(Chan, Golub & LeVeque 1983): with a float32 shift within a factor of two of
the data, ``d = x − shift`` is exact (Sterbenz), and

    μ_B = shift + Σd/m,   σ²_B = Σd²/m − (Σd/m)²

has only the rounding of the sums left, magnified by the condition number
``1 + c²`` of the subtraction, ``c = (μ_B − shift)/σ_B``. A single data
value as the shift can sit several σ away (c² ≈ 10); the shift here is the
mean of a sample of `SAMPLE` values per feature spread over the batch,
which puts it within about σ/8 of the batch mean (c² ≈ 0.02) for a small
read: the rounding of a float32 two-pass computation, in one pass.
Keeping the mean as the pair ``shift + delta`` lets the layer normalize as
``((x − shift) − delta)·a + β`` without ever forming the rounded mean.

The sums are the backend's (`kerasbn.ops.dispatch.sums`), arranged so that
they stay exact to float32 rounding of the result. Masked batches weight
``d`` and the count, around the mean of the kept values (one more pass: a
sample may hold only padding); ghost batches are a leading kept axis, each
group with its own shift; across `tf.distribute` replicas the shifted sums
are moved to a common shift and added (`all_reduce_moments`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kerasbn.ops import dispatch

# Values per feature in the sample whose mean is the shift: the shift then
# lies within about σ/8 of the batch mean for independent data, and 64
# values per feature are a small read next to a batch.
SAMPLE = 64


@dataclass(frozen=True)
class Moments:
    """Per-feature batch statistics, broadcastable against the input.

    Attributes:
        shift: A float32 estimate of the mean, per feature; ``mean = shift + delta``.
        delta: Mean of ``x − shift``.
        variance: The biased batch variance ``σ²_B`` (never negative).
        count: Number of values reduced per feature, ``m``.
        centred: ``x − shift`` as the sums read it (None with a mask), for
            the normalization to reuse where no compiler would share the
            pass (torch eagerly; TensorFlow's and XLA's graphs share it).
    """

    shift: Any
    delta: Any
    variance: Any
    count: Any
    centred: Any = None

    @property
    def mean(self) -> Any:
        return self.shift + self.delta


def static_count(shape: Sequence[int | None], axes: Sequence[int]) -> int | None:
    """``m`` when every reduced dimension is known at trace time, else None."""
    dims = [shape[a] for a in axes]
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def _dynamic_count(x, axes: Sequence[int], dtype):
    ops = dispatch.array_ops()
    m = static_count(x.shape, axes)
    if m is not None:
        return ops.convert_to_tensor(float(m), dtype=dtype)
    shape = ops.shape(x)
    count = ops.convert_to_tensor(1.0, dtype=dtype)
    for a in axes:
        count = count * ops.cast(shape[a], dtype)
    return count


def _sample(x, axes: Sequence[int]):
    """About `SAMPLE` values per feature from across the reduced axes.

    The outermost reduced axis (the batch, whose order carries nothing in
    training) gives its first rows, a contiguous read; every other reduced
    axis is strided from end to end, since the borders of a feature map or
    the first steps of a sequence are often not typical of the rest (and a
    strided read of the whole batch is a slow copy in a TensorFlow graph).
    The budget is shared out from the shortest axis up (an axis of size 1
    takes none of it); a strided axis of size n with k samples has step
    n // k, so it gives between k and 2k − 1 values.
    """
    ops = dispatch.array_ops()
    shape = ops.shape(x)
    outermost = min(axes)
    order = sorted(axes, key=lambda a: math.inf if x.shape[a] is None else x.shape[a])
    budget = float(SAMPLE)
    index = [slice(None)] * len(x.shape)
    for i, a in enumerate(order):
        k = max(1, math.ceil(budget ** (1.0 / (len(order) - i))))
        n = x.shape[a]
        k = k if n is None else min(k, n)
        if a == outermost:
            index[a] = slice(0, k)
        elif n is None:
            index[a] = slice(None, None, ops.maximum(shape[a] // k, 1))
        else:
            index[a] = slice(None, None, max(n // k, 1))
        budget /= k
    return x[tuple(index)]


def sample_mean(x, axes: Sequence[int]):
    """A float32 estimate of the per-feature mean from a strided sample (see `SAMPLE`).

    Computed as ``s₀ + mean(s − s₀)`` around the sample's first value ``s₀``
    so that the estimate is good to rounding at the scale of the spread,
    whatever the offset.
    """
    ops = dispatch.array_ops()
    s = _sample(x, axes)
    first = s[tuple(slice(0, 1) if a in axes else slice(None) for a in range(len(x.shape)))]
    mean = first + ops.mean(s - first, axis=axes, keepdims=True)
    # A strided slice with a step known only at run time loses the static
    # rank on TensorFlow; the keepdims shape is known but for a kept batch axis.
    return ops.reshape(mean, [1 if a in axes else (-1 if n is None else n) for a, n in enumerate(x.shape)])


def _masked_mean(x, axes: Sequence[int], w):
    """The mean of the kept values, around the sample mean; the sample mean where none is kept.

    A strided sample of a masked batch may hold only padding, which can lie
    far from the data (a shift there would cost every digit of the
    variance): masked batches take this extra pass over the data instead.
    """
    ops = dispatch.array_ops()
    guess = ops.stop_gradient(sample_mean(x, axes))
    s1, count = dispatch.sums([(x - guess) * w, w], axes)
    delta = ops.cast(s1 / ops.maximum(count, 1.0), x.dtype)
    return guess + ops.where(count > 0, delta, ops.zeros_like(delta))


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
    ops = dispatch.array_ops()
    axes = tuple(axes)
    if mask is None:
        shift = sample_mean(x, axes)
    else:
        w = ops.cast(ops.broadcast_to(mask, ops.shape(x)), x.dtype)
        shift = _masked_mean(x, axes, w)
    shift = dispatch.materialize(ops.stop_gradient(shift))
    d = x - shift
    if mask is not None:
        d = d * w
        (count,) = dispatch.sums([w], axes)
    s1, s2 = dispatch.moment_sums(d, axes)
    if mask is None:
        # In the sums' dtype: TensorFlow adds the partial sums in float64.
        count = _dynamic_count(x, axes, s1.dtype)
    if synchronized:
        shift, s1, s2, count = dispatch.all_reduce_moments(shift, s1, s2, count)
    safe = ops.maximum(count, 1.0)
    delta = s1 / safe
    variance = ops.maximum(s2 / safe - delta * delta, 0.0)
    return Moments(
        shift=shift,
        delta=ops.cast(delta, x.dtype),
        variance=ops.cast(variance, x.dtype),
        count=ops.cast(count, x.dtype),
        centred=d if mask is None else None,
    )
