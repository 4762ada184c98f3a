"""The JAX arrangements of the layer's sums.

On accelerators XLA fuses sibling reductions and their producers into one
pass by itself, so plain sums are right there. On CPU, XLA hands plain sums
to YNNPACK, which cannot fuse their producers, so each sum re-reads a
materialized input: the statistics' Σd and Σd² share one variadic reduction
over leading blocks instead (one read of the data), whose partial sums are
then added with compensation (JAX has no float64 by default), and the
gradient's Σdy and Σdy·d run over short inner blocks first
(`kerasbn.ops.reduce`).

`keras.distribution` compiles one SPMD program over the global batch: the
reductions are already global and XLA inserts the all-reduce itself, so the
cross-replica functions are the generic ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, partial

import jax
from jax import lax
from keras import ops

from kerasbn.ops import generic, reduce

all_reduce_sums = generic.all_reduce_sums
all_reduce_moments = generic.all_reduce_moments
fused_available = generic.fused_available


def sums(values: Sequence, axes: Sequence[int], exact: bool = True) -> list:
    """``[Σ v over axes (keepdims) for v in values]``, arranged for the device (see the module doc).

    One jitted function (compiled once per shape): run eagerly (Keras's
    ``jit_compile=False``), the blocked sums' dozen small ops were each a
    dispatch; inside an outer `jax.jit` it is inlined.
    """
    if len(values) == 1 or jax.default_backend() != "cpu":
        return generic.sums(values, sorted(axes))
    return list(_cpu_sums(tuple(values), tuple(sorted(axes)), exact))


@partial(jax.jit, static_argnums=(1, 2))
def _cpu_sums(values: tuple, axes: tuple, exact: bool) -> tuple:
    return tuple(_arranged_sums(list(values), list(axes), exact))


def _arranged_sums(values: Sequence, axes: Sequence[int], exact: bool) -> list:
    if not exact:
        inner = reduce.inner_block_sums(values, axes, variadic_sums)
        if inner is not None:
            return inner
    # Blocked from 2 blocks' worth on, as on TensorFlow: a plain sum of a few
    # hundred values per feature is exact enough, but YNNPACK's plain sums
    # read a materialized d, one pass each, where the variadic reduction
    # reads x once (on 256×1024, 11 passes over the data became 8).
    return reduce.blocked_sums(
        values,
        axes,
        leading=True,
        variadic=variadic_sums,
        acc=values[0].dtype,
        outer_sums=_partial_sums,
        small=2 * reduce.BLOCK,
    )


def _partial_sums(partials: Sequence, axes: Sequence[int]) -> list:
    """The statistics' partial sums added over ``axes`` without float64.

    JAX computes in float32 unless float64 is enabled for the whole process,
    and XLA:CPU adds sibling float32 reductions of the partials nearly in
    sequence (5e-7 relative for 625 partials per feature). The partials are
    added along one axis at a time, in runs as long as that axis, and the
    last axis with compensated (Kahan–Babuška) additions. The compensated
    reduction runs as scalar code, so it only sees what is left after the
    others: a few thousand values on the shapes benchmarked.
    """
    axes = sorted(axes)
    for a in axes[:-1]:
        partials = [ops.sum(p, axis=a, keepdims=True) for p in partials]
    return _compensated_sums(partials, axes[-1])


def _compensated_sums(values: Sequence, axis: int) -> list:
    """Keepdims sums over ``axis`` with a running error term per sum (TwoSum)."""
    out = _compensated_sum(tuple(values), axis)
    keep = [1 if a == axis else d for a, d in enumerate(values[0].shape)]
    return [ops.reshape(o, keep) for o in out]


# One reducer function per arity, made once: `lax.reduce` caches its traced
# reducer by the function object, and eagerly (Keras's `jit_compile=False`)
# a new closure per call compiled a new XLA computation per call (a training
# step took 7× Keras's eager step).
@cache
def _compensated_adder(n: int):
    def add(a, b):
        sums, errors = [], []
        for i in range(n):
            s = a[i] + b[i]
            bp = s - a[i]
            sums.append(s)
            errors.append(a[n + i] + b[n + i] + ((a[i] - (s - bp)) + (b[i] - bp)))
        return tuple(sums + errors)

    return add


@cache
def _adder(n: int):
    def add(a, b):
        return tuple(u + v for u, v in zip(a, b, strict=True))

    return add


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _compensated_sum(values, axis):
    n = len(values)
    zeros = tuple(lax.full((), 0, v.dtype) for v in values)
    out = lax.reduce(values + tuple(lax.full_like(v, 0) for v in values), zeros + zeros, _compensated_adder(n), (axis,))
    return tuple(s + e for s, e in zip(out[:n], out[n:], strict=True))


@_compensated_sum.defjvp
def _compensated_sum_jvp(axis, primals, tangents):
    # As for `_variadic_sum`: the sum is linear, its tangent a plain sum.
    (values,), (dvalues,) = primals, tangents
    return _compensated_sum(values, axis), tuple(lax.reduce_sum(d, (axis,)) for d in dvalues)


def materialize(x):
    """``x`` behind an optimization barrier, so that XLA computes it once.

    XLA fuses a small per-feature value (the shift) into each consumer, and a
    fusion that reads the data through it cannot write its output over the
    data. Where a loop carries the data (`lax.fori_loop`, `scan`), ∂/∂x then
    takes a copy per step; a materialized value keeps the big fusions
    elementwise.
    """
    return lax.optimization_barrier(x)


def variadic_sums(values: Sequence, axes: Sequence[int]) -> list:
    """Keepdims sums of several arrays in one XLA reduction."""
    out = _variadic_sum(tuple(values), tuple(axes))
    keep = [1 if a in axes else d for a, d in enumerate(values[0].shape)]
    return [ops.reshape(o, keep) for o in out]


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _variadic_sum(values, axes):
    zeros = tuple(lax.full((), 0, v.dtype) for v in values)
    return lax.reduce(values, zeros, _adder(len(values)), axes)


@_variadic_sum.defjvp
def _variadic_sum_jvp(axes, primals, tangents):
    # JAX differentiates a generic `lax.reduce` through a tree of slices that
    # materializes its inputs; the sum is linear, so its tangent is the plain
    # sum of the tangents (the autodiff paths: masks, renorm).
    (values,), (dvalues,) = primals, tangents
    return _variadic_sum(values, axes), tuple(lax.reduce_sum(d, axes) for d in dvalues)
