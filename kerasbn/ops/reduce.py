"""Per-feature sums arranged for each backend's compiler.

JAX's XLA reduces in blocks: float32 sums of 10⁵ values stay within ~1e-6,
and on accelerators sibling reductions fuse into one pass, so a plain
`ops.sum` is right there. On CPU the statistics' Σd and Σd² share one
variadic reduction over leading blocks, as under TF-XLA below.

TensorFlow's CPU reductions, and XLA as TensorFlow 2.21 lowers them,
accumulate nearly sequentially (~3e-5 relative for 10⁵ positive values) and
TF-XLA runs each reduction as its own loop over the data. Here the sums are
taken in two levels: float32 partial sums over the innermost reduced axes (at
most `BLOCK` values, exact to ~1e-7; a longer innermost axis is split), then
the partials, in float64 for the statistics. The partials are a small
fraction of the data and the inner reduction runs along contiguous memory, so
this is both exact and faster than one reduction; the float64 cast between
the levels also keeps XLA from merging them back. Inside XLA the inner level
of all the sums is one variadic reduction (one pass over the data for Σd and
Σd²). Measured on (32, 56, 56, 64) float32, 2 CPU cores: Σd and Σd² took
12.0 ms under TF-XLA as two blocked reductions and 5.6 ms as one variadic
one; a graph took 3.7 ms blocked against 6.1 ms plain; casting the data to
float64 took 22–27 ms.

The gradient's sums read two arrays (dy and the data); under XLA:CPU, on
either backend, their first level runs over short inner blocks instead
(`_inner_block_sums`), the one layout XLA keeps vectorized for two inputs.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

from keras import backend, ops

# The most values a float32 partial sum accumulates on TensorFlow: short
# enough that the partial sums of squares are exact to ~1e-7 even when the
# shift leaves the mean a few σ away (the variance then cancels against it).
BLOCK = 32
# Up to this many values per feature a single reduction is used.
SMALL = 1024
# Consecutive positions per partial sum of the gradient under XLA:CPU (see
# `_inner_block_sums`): 4 and 16 measured slower on every shape tried.
INNER = 8


def in_tf_xla() -> bool:
    """Whether the op being traced is inside a TensorFlow XLA cluster."""
    if backend.backend() != "tensorflow":
        return False
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


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


def _block_size(n: int | None) -> int | None:
    """The largest divisor of ``n`` that is a usable block, if any."""
    if n is None:
        return None
    for b in range(BLOCK, 7, -1):
        if n % b == 0:
            return b
    return None


def sums(values: Sequence, axes: Sequence[int], exact: bool = True) -> list:
    """``[Σ v over axes (keepdims) for v in values]``, all of one shape and dtype.

    Args:
        values: Tensors of the same shape and dtype.
        axes: The axes to reduce.
        exact: On TensorFlow, accumulate across blocks in float64 (the
            statistics); otherwise in the values' dtype (the gradient).
    """
    axes = sorted(axes)
    name = backend.backend()
    jax_cpu = name == "jax" and len(values) > 1 and _jax_on_cpu()
    if not exact and len(values) > 1 and (jax_cpu or in_tf_xla()):
        inner = _inner_block_sums(values, axes, _jax_sums if jax_cpu else _xla_sums)
        if inner is not None:
            return inner
    if jax_cpu:
        # XLA:CPU hands plain sums to YNNPACK, which cannot fuse their
        # producers, so each sum re-reads a materialized input. One variadic
        # reduction over leading blocks reads the data once: Σd and Σd² on
        # (32, 56, 56, 64) took 0.7 ms against 2.3 ms (a copy: 0.28 ms).
        leading, variadic, acc = True, _jax_sums, values[0].dtype
    elif name == "tensorflow":
        # TF-XLA emits a fast, vectorized loop for a reduction over leading
        # axes (each output element a contiguous run) and a slow one over
        # inner axes; Eigen in a graph prefers the innermost ones.
        leading = in_tf_xla()
        variadic = _xla_sums if leading else None
        acc = "float64" if exact else values[0].dtype
    else:
        # JAX on an accelerator: XLA fuses sibling reductions and their
        # producers into one pass by itself (measured on an H200: 31 µs plain
        # against 51 µs variadic for Σd and Σd² on (32, 56, 56, 64)).
        return [ops.sum(v, axis=axes, keepdims=True) for v in values]
    x = values[0]
    m = math.prod(x.shape[a] or 0 for a in axes)
    if 0 < m <= SMALL:
        # Few values per feature: one float32 reduction is exact enough
        # (~1e-6 at m = 256) and its fixed cost is what counts.
        return [ops.cast(ops.sum(v, axis=axes, keepdims=True), acc) for v in values]
    keep_shape = _shape(x, [1 if a in axes else d for a, d in enumerate(x.shape)])
    block = _block_axes(x.shape, axes, leading=leading)
    outer = [a for a in axes if a not in block]
    if not block:
        # The first (last) reduced axis alone is longer than a block: split
        # it into (b, n/b) (or (n/b, b)) and sum over the b-blocks first.
        split = axes[0] if leading else axes[-1]
        b = _block_size(x.shape[split])
        if b is None:
            # No block to sum exactly in float32: accumulate all in `acc`.
            return [ops.sum(ops.cast(v, acc), axis=axes, keepdims=True) for v in values]
        n = x.shape[split]
        dims = list(x.shape)
        dims[split : split + 1] = [b, n // b] if leading else [n // b, b]
        values = [ops.reshape(v, _shape(v, dims)) for v in values]
        block = [split] if leading else [split + 1]
        outer = [a + 1 if a > split else a for a in axes] + ([split + 1] if leading else [])
        outer = [a for a in outer if a not in block]
    if variadic is not None:
        partials = variadic(values, block)
    else:
        partials = [ops.sum(v, axis=block, keepdims=True) for v in values]
    partials = [ops.cast(p, acc) for p in partials]
    if outer:
        partials = [ops.sum(p, axis=outer, keepdims=True) for p in partials]
    return [ops.reshape(p, keep_shape) for p in partials]


def _inner_block_sums(values: Sequence, axes: Sequence[int], variadic) -> list | None:
    """The gradient's sums under XLA:CPU, over runs of `INNER` consecutive positions.

    Σdy and Σdy·d read two arrays. XLA:CPU emits the reduction over leading
    blocks that suits the one-array statistics as scalar code once it reads
    two arrays of half precision (or two float32 arrays with more than one
    per-feature operand), and the scalar loop then strides across rows far
    apart. Summing 8 consecutive positions at a time (a run of 8·C values in
    memory) first stays vectorized in every case: on (32, 56, 56, 64) 1.6 ms
    against 2.1 ms in float32 and 1.1 ms against 10.6 ms in bfloat16 under
    TF-XLA; 1.2 against 2.2 ms and 0.7 against 5.6 ms under JAX; no worse on
    the other shapes measured (C from 3 to 1024). Few values per feature gain
    too: the JAX training step on (256, 1024) took 0.16 ms against 0.21 ms
    with one plain reduction. None where the reduced axes are not one
    contiguous run followed by the feature axes, or their size is unknown,
    under two blocks or not a multiple of `INNER`.
    """
    lo, hi = axes[0], axes[-1]
    shape = values[0].shape
    if list(axes) != list(range(lo, hi + 1)) or hi == len(shape) - 1:
        return None
    m = math.prod(shape[a] or 0 for a in axes)
    if m % INNER or m < 2 * INNER:
        return None
    pre, post = list(shape[:lo]), list(shape[hi + 1 :])
    blocked = [ops.reshape(v, _shape(v, pre + [m // INNER, INNER] + post)) for v in values]
    partials = variadic(blocked, [lo + 1])
    keep_shape = _shape(values[0], [1 if a in axes else d for a, d in enumerate(shape)])
    return [ops.reshape(ops.sum(p, axis=lo, keepdims=True), keep_shape) for p in partials]


def _jax_on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def _jax_sums(values, axes):
    """Keepdims sums of several arrays in one XLA reduction."""
    out = _jax_variadic_sum(tuple(values), tuple(axes))
    keep = [1 if a in axes else d for a, d in enumerate(values[0].shape)]
    return [ops.reshape(o, keep) for o in out]


_JAX_VARIADIC: list = []


def _jax_variadic_sum(values, axes):
    if not _JAX_VARIADIC:
        import jax
        from jax import lax

        # JAX differentiates a generic `lax.reduce` through a tree of slices
        # that materializes its inputs; the sum is linear, so its tangent is
        # the plain sum of the tangents (the autodiff paths: masks, renorm).
        @partial(jax.custom_jvp, nondiff_argnums=(1,))
        def variadic_sum(values, axes):
            zeros = tuple(lax.full((), 0, v.dtype) for v in values)
            return lax.reduce(values, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), axes)

        @variadic_sum.defjvp
        def _(axes, primals, tangents):
            (values,), (dvalues,) = primals, tangents
            return variadic_sum(values, axes), tuple(lax.reduce_sum(d, axes) for d in dvalues)

        _JAX_VARIADIC.append(variadic_sum)
    return _JAX_VARIADIC[0](values, axes)


def _shape(x, dims):
    """``dims`` with each unknown entry read from ``x`` at run time (TensorFlow)."""
    if None not in dims:
        return dims
    import tensorflow as tf

    shape = tf.shape(x)
    return tf.stack([shape[i] if d is None else d for i, d in enumerate(dims)])


_REDUCERS: dict = {}


def _xla_sums(values, axes):
    """Keepdims sums of several tensors in one XLA reduction."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    dtype = values[0].dtype
    key = (dtype, len(values))
    if key not in _REDUCERS:
        n = len(values)

        def add(*args):
            return [a + b for a, b in zip(args[:n], args[n:])]

        zero = tf.TensorSpec([], dtype)
        _REDUCERS[key] = tf.function(add).get_concrete_function(*[zero] * (2 * n))
    init = [tf.zeros([], dtype)] * len(values)
    out = xla.variadic_reduce(list(values), init, axes, _REDUCERS[key])
    keep = [1 if a in axes else d for a, d in enumerate(values[0].shape)]
    return [tf.reshape(o, _shape(values[0], keep)) for o in out]
