"""Blocked per-feature sums, exact to float32 rounding of the result.

A float32 sum of many values is only as good as its order of accumulation:
nearly sequential (TensorFlow's CPU reductions, XLA as TensorFlow lowers
them) it drifts by ~3e-5 relative over 10⁵ positive values. Summing first
over blocks of at most `BLOCK` values (exact to ~1e-7) and then over the
partial sums, in float64 where the backend allows it, keeps the sums exact.
Which axes make the blocks, and whether the sums of several arrays share one
variadic reduction, is each compiler's choice: `kerasbn.ops.tensorflow` and
`kerasbn.ops.jax` make it and call `blocked_sums` or `inner_block_sums` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from keras import ops

# The most values a float32 partial sum accumulates: short enough that the
# partial sums of squares are exact to ~1e-7.
BLOCK = 32
# Up to this many values per feature a single reduction is used, where the
# backend's reduction of that many is exact enough (see `blocked_sums`).
SMALL = 1024
# Consecutive positions per partial sum of the gradient (see `inner_block_sums`).
INNER = 8

# ``variadic(values, axes)``: keepdims sums of several arrays in one reduction.
Variadic = Callable[[Sequence, Sequence[int]], list]


def keepdims_shape(x, dims: Sequence[int | None]) -> list:
    """``dims`` with each unknown entry read from ``x`` at run time."""
    if None not in dims:
        return list(dims)
    shape = ops.shape(x)
    return [shape[i] if d is None else d for i, d in enumerate(dims)]


def _block_axes(shape: Sequence[int | None], axes: Sequence[int], leading: bool) -> list[int]:
    """The outermost (``leading``) or innermost reduced axes that fit one block."""
    block: list[int] = []
    size = 1
    for a in sorted(axes, reverse=not leading):
        if shape[a] is None or size * shape[a] > BLOCK:
            break
        block.append(a)
        size *= shape[a]
    return sorted(block)


def block_size(n: int | None) -> int | None:
    """The largest divisor of ``n`` that is a usable block, if any."""
    if n is None:
        return None
    for b in range(BLOCK, 7, -1):
        if n % b == 0:
            return b
    return None


def blocked_sums(
    values: Sequence,
    axes: Sequence[int],
    leading: bool,
    variadic: Variadic | None,
    acc,
    outer_sums: Variadic | None = None,
    small: int = SMALL,
) -> list:
    """``[Σ v over axes (keepdims) for v in values]`` in two levels.

    Args:
        values: Tensors of one shape and dtype.
        axes: The reduced axes, sorted.
        leading: Make the blocks of the outermost reduced axes (each output
            element of the first level a contiguous run in memory) rather
            than of the innermost ones.
        variadic: Sums the first level of all values in one reduction, or
            None for one reduction per value.
        acc: The dtype the partial sums are added in.
        outer_sums: Adds the partial sums over the remaining axes (all
            values in one call); plain sums in ``acc`` if None.
        small: Up to this many values per feature, one plain reduction.
    """
    x = values[0]
    # A list, not a generator: `torch.compile` breaks its graph at a generator expression.
    m = math.prod([x.shape[a] or 0 for a in axes])
    if 0 < m <= small:
        # Few values per feature: one float32 reduction is exact enough and
        # its fixed cost is what counts.
        return [ops.cast(ops.sum(v, axis=axes, keepdims=True), acc) for v in values]
    keep_shape = keepdims_shape(x, [1 if a in axes else d for a, d in enumerate(x.shape)])
    block = _block_axes(x.shape, axes, leading=leading)
    outer = [a for a in axes if a not in block]
    if not block:
        # The first (last) reduced axis alone is longer than a block: split
        # it into (b, n/b) (or (n/b, b)) and sum over the b-blocks first.
        split = axes[0] if leading else axes[-1]
        b = block_size(x.shape[split])
        if b is None:
            # No block to sum exactly in float32: accumulate all in `acc`.
            return [ops.sum(ops.cast(v, acc), axis=axes, keepdims=True) for v in values]
        n = x.shape[split]
        dims = list(x.shape)
        dims[split : split + 1] = [b, n // b] if leading else [n // b, b]
        values = [ops.reshape(v, keepdims_shape(v, dims)) for v in values]
        block = [split] if leading else [split + 1]
        outer = [a + 1 if a > split else a for a in axes] + ([split + 1] if leading else [])
        outer = [a for a in outer if a not in block]
    if variadic is not None:
        partials = variadic(values, block)
    else:
        partials = [ops.sum(v, axis=block, keepdims=True) for v in values]
    partials = [ops.cast(p, acc) for p in partials]
    if outer and outer_sums is not None:
        partials = outer_sums(partials, outer)
    elif outer:
        partials = [ops.sum(p, axis=outer, keepdims=True) for p in partials]
    return [ops.reshape(p, keep_shape) for p in partials]


def inner_block_sums(values: Sequence, axes: Sequence[int], variadic: Variadic) -> list | None:
    """Sums over runs of `INNER` consecutive positions first, then over the runs.

    For the gradient's Σdy and Σdy·d, which read two arrays, under XLA:CPU:
    its reduction over leading blocks turns into scalar code once it reads
    two arrays of half precision (or two float32 arrays with more than one
    per-feature operand), and the scalar loop strides across rows far apart.
    A run of `INNER` positions is a run of ``INNER·C`` values in memory, a
    layout XLA keeps vectorized in every case measured (docs/benchmarks.md).
    None where the reduced axes are not one contiguous run followed by the
    feature axes, or their size is unknown, under two runs or not a multiple
    of `INNER`.
    """
    lo, hi = axes[0], axes[-1]
    shape = values[0].shape
    if list(axes) != list(range(lo, hi + 1)) or hi == len(shape) - 1:
        return None
    m = math.prod([shape[a] or 0 for a in axes])
    if m % INNER or m < 2 * INNER:
        return None
    pre, post = list(shape[:lo]), list(shape[hi + 1 :])
    blocked = [ops.reshape(v, keepdims_shape(v, pre + [m // INNER, INNER] + post)) for v in values]
    partials = variadic(blocked, [lo + 1])
    keep_shape = keepdims_shape(values[0], [1 if a in axes else d for a, d in enumerate(shape)])
    return [ops.reshape(ops.sum(p, axis=lo, keepdims=True), keep_shape) for p in partials]
