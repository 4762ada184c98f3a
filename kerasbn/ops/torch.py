"""The PyTorch arrangements: torch's own batch-norm kernels eagerly, a
closed-form `torch.autograd.Function` under `torch.compile`,
`torch.distributed`'s all-reduce, and the array functions the layer calls on
every step as torch calls (`array_ops`).

Sums. torch's CPU reductions add a contiguous inner run of float32 in
cascades (pairwise blocks), good to float32 rounding of the result (3e-7
relative for Σd² over 10⁵ values), but not every layout nor inductor's
code: the statistics take blocked sums (see `sums`).
``torch.linalg.vector_norm`` for Σd² is off by 1e-5 to 5e-4 relative, and
torch's own batch statistics (``batch_norm_update_stats``) by 1e-5: neither
is used. Eagerly, Σd and Σd² over blocks come from one pass of torch's
batch-norm gradient kernel (see `moment_sums`), each op run eagerly being a
pass over the data of its own.

Eager training. The layer's exact statistics go into torch's kernels as
TensorFlow's fused kernels get them (`kerasbn.ops.tensorflow`): the forward
kernel in inference mode (``torch.batch_norm``) fed ``d = x − shift`` with
``delta`` as its mean, and the gradient kernel
(``native_batch_norm_backward`` with ``train=True``) with the statistics as
its saved mean and inverse standard deviation. The inference kernel computes
``d·a + (β − δ·a)``: fed ``d``, about σ wide whatever the offset, that is
exact to rounding at the scale of the spread, where ``x·a`` would round at
the scale of the offset. Half-precision data go in as they are, with the
mean as one float32 value, as on TensorFlow. The gradient kernel's float32
sums of dy and dy·x̂ are good to ≤ 2e-5 relative of dγ and dβ (1e6 values
per feature) and 2e-7 of dx. The kernels do in one pass each what a
closed form of torch ops takes several for (two reductions, an ``addcmul``
and a subtraction, each its own pass eagerly); docs/benchmarks.md has the
measurements.

Compiled training (``torch.compile``, Keras's ``jit_compile=True``).
Inductor lowers the gradient kernel into generic code that it does not fuse
with its neighbours, so the closed form runs as plain torch ops in an
autograd function that saves ``x`` rather than ``d`` and recomputes ``d``
in the backward: inductor fuses the two sums into one pass and ``dx`` into
another, where a saved ``d`` is one more tensor to write and read.

Replicas. ``synchronized=True`` all-reduces over the default
`torch.distributed` process group (one process per replica, as
DistributedDataParallel runs): the shifted sums are moved to a common shift
in float64 and added, as across `tf.distribute` replicas. Without an
initialized process group it is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from keras import ops as keras_ops

from kerasbn.ops import generic, reduce

materialize = generic.materialize


def sums(values: Sequence, axes: Sequence[int], exact: bool = True) -> list:
    """``[Σ v over axes (keepdims) for v in values]``; the statistics' (``exact``) blocked.

    torch's cascade sums cover a contiguous inner reduction only: over an
    outer or strided axis (N and W of NCW) it accumulates in sequence, and
    inductor emits reduction loops of its own; both missed the statistics'
    bound (a variance of 191 × 8 values per feature at scale 10³). The
    statistics are summed over blocks in float32, then over the partial sums
    in float64 (`kerasbn.ops.reduce.blocked_sums`), from 2 blocks' worth of
    values on as on TensorFlow. The gradient's sums keep plain ones.
    """
    if exact:
        small = 2 * reduce.BLOCK
        return reduce.blocked_sums(values, sorted(axes), leading=True, variadic=None, acc="float64", small=small)
    return generic.sums(values, axes)


def moment_sums(d, axes: Sequence[int]) -> list:
    """``[Σd, Σd²]`` over ``axes`` (keepdims): eagerly both in one pass of a torch kernel.

    ``native_batch_norm_backward`` with ``dy = x = d``, mean 0 and inverse
    standard deviation 1 returns ``Σdy`` and ``Σdy·(x − mean)·invstd``,
    that is ``Σd`` and ``Σd²``, from one read of ``d``. Viewed as
    ``(b, rest)``, ``b`` a block of the leading reduced positions (a divisor
    of their count, at most `reduce.BLOCK`), its "channels" are partial sums
    over ``b`` values, which torch's float32 cascade sums then add: one pass
    instead of three (``d·d`` written, then read by its sum, and ``d`` read
    by its own). Where that view does not exist (the first axis kept, no
    block dividing the count), under `torch.compile` (inductor fuses the
    plain sums) or with a gradient to record, the exact `sums` of ``d`` and
    ``d·d``.
    """
    if _compiling() or d.requires_grad or d.dtype not in (torch.float32, torch.float64):
        return sums([d, d * d], axes)
    axes = sorted(axes)
    lead = 0
    while lead < len(axes) and axes[lead] == lead:
        lead += 1
    n = math.prod(d.shape[:lead])
    m = math.prod([d.shape[a] for a in axes])
    keep = [1 if a in axes else k for a, k in enumerate(d.shape)]
    if lead == len(axes) and m <= reduce.SMALL:
        # Up to a thousand rows torch's cascade sum over them is exact to
        # float32 rounding, and a read of d and one of d·d cost less than the
        # kernel's fixed cost (256×1024: 0.06 against 0.15 ms).
        rows = d.reshape(m, -1)
        return [s.to(torch.float64).reshape(keep) for s in (rows.sum(0), (rows * rows).sum(0))]
    block = n if 8 <= n <= reduce.BLOCK else reduce.block_size(n)
    if block is None or m <= 2 * reduce.BLOCK:
        return sums([d, d * d], axes)
    flat = d.reshape(block, -1)
    zero = torch.zeros(flat.shape[1], dtype=d.dtype, device=d.device)
    one = torch.ones(flat.shape[1], dtype=d.dtype, device=d.device)
    _, s2, s1 = torch.ops.aten.native_batch_norm_backward(
        flat, flat, None, None, None, zero, one, True, 0.0, [False, True, True]
    )
    # The partials as (leading blocks, *kept and trailing axes); torch's
    # cascade sums each reduced run, the innermost first: a float64 pass
    # over them cost more than the kernel's read of d (0.7 ms on 32×56×56×64).
    rest = [n // block, *d.shape[lead:]]
    inner = [a - lead + 1 for a in axes[lead:]]
    out = []
    for p in (s1, s2):
        p = p.reshape(rest)
        if inner:
            p = p.sum(inner, keepdim=True)
        out.append(p.reshape(n // block, -1).sum(0).to(torch.float64).reshape(keep))
    return out


# --------------------------------------------------------------------------- array functions


def _tensor(x):
    """A Keras variable's tensor, or ``x``."""
    return x if isinstance(x, torch.Tensor) else getattr(x, "value", x)


def _dtype(dtype):
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class _ArrayOps:
    """The `keras.ops` functions the statistics and the layer call on every step, as torch calls.

    Eagerly each `keras.ops` call costs 1 to 15 µs of Python (its symbolic
    check, tree flattening, conversion) where the torch call costs about 1:
    with some twenty per step, that was a fifth of a training step on
    256×1024 (docs/benchmarks.md). The same signatures as `keras.ops`; any
    other name is `keras.ops`'s own.
    """

    @staticmethod
    def cast(x, dtype):
        return _tensor(x).to(_dtype(dtype))

    @staticmethod
    def reshape(x, shape):
        return _tensor(x).reshape(shape)

    @staticmethod
    def mean(x, axis, keepdims=False):
        return torch.mean(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def maximum(x, y):
        if isinstance(y, (int, float)):
            return torch.clamp_min(x, y)
        return torch.maximum(x, y)

    @staticmethod
    def stop_gradient(x):
        return _tensor(x).detach()

    @staticmethod
    def shape(x):
        return tuple(x.shape)

    def __getattr__(self, name):
        return getattr(keras_ops, name)


array_ops = _ArrayOps()


# --------------------------------------------------------------------------- replicas


def _process_group_size() -> int:
    """The default process group's world size; an error where there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "BatchNormalization(synchronized=True) on the torch backend all-reduces over torch.distributed: "
            "call torch.distributed.init_process_group() in every process first (or use synchronized=False)."
        )
    return dist.get_world_size()


def all_reduce_sums(*sums):
    """Per-process sums added over the default process group (the gradient's Σdy, Σdy·x̂)."""
    if _process_group_size() == 1:
        return sums
    out = []
    for s in sums:
        total = s.detach().to(torch.float64).clone()
        dist.all_reduce(total)
        out.append(total.to(s.dtype))
    return tuple(out)


def all_reduce_moments(shift, s1, s2, count):
    """Global ``(shift, Σd, Σd², m)`` from per-process shifted sums.

    As `kerasbn.ops.tensorflow.all_reduce_moments`: each process's sums move
    to the processes' mean shift by ``Σ(d + δ) = Σd + mδ`` and
    ``Σ(d + δ)² = Σd² + 2δΣd + mδ²``, in float64, then are added.
    """
    size = _process_group_size()
    if size == 1:
        return shift, s1, s2, count
    f64 = torch.float64
    total = shift.detach().to(f64).clone()
    dist.all_reduce(total)
    # The common shift in the shift's own dtype, and the sums moved to exactly that value.
    common = (total / size).to(shift.dtype)
    move = shift.detach().to(f64) - common.to(f64)
    s1, s2 = s1.detach().to(f64), s2.detach().to(f64)
    count = torch.as_tensor(count, dtype=f64) * torch.ones_like(s1)
    s2 = s2 + 2.0 * move * s1 + count * move * move
    s1 = s1 + count * move
    packed = torch.stack([s1, s2, count])
    dist.all_reduce(packed)
    return common, packed[0], packed[1], packed[2]


# --------------------------------------------------------------------------- fused kernels


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def fused_available(x, feature_axes: Sequence[int], synchronized: bool) -> bool:
    """Whether the torch paths here can run this normalization.

    float32, float16 or bfloat16 data whose feature axes are one contiguous
    run (viewed as (outer, C, inner) for the kernels), without cross-process
    statistics (those take `kerasbn.ops.normalize` with the all-reduce in
    its gradient).
    """
    if synchronized or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.ndim < 2:
        return False
    axes = sorted(feature_axes)
    return axes == list(range(axes[0], axes[-1] + 1))


def _kernel_shape(x, like) -> list[int]:
    """(outer, C[, inner]): ``x`` viewed with its feature axes (those of ``like`` not 1) as one.

    A feature axis of size 1 may be taken for a reduced one; its size makes
    the view the same either way.
    """
    shape = list(x.shape)
    features = [i for i, n in enumerate(like.shape) if n != 1] or [len(shape) - 1]
    lo, hi = features[0], features[-1]
    outer, channels, inner = math.prod(shape[:lo]), math.prod(shape[lo : hi + 1]), math.prod(shape[hi + 1 :])
    return [outer, channels] if inner == 1 else [outer, channels, inner]


def _flat(v, channels: int):
    return None if v is None else v.reshape(channels)


class _Kernels(torch.autograd.Function):
    """``((x − shift) − delta)·γ/σ + β`` through torch's batch-norm kernels (see the module doc)."""

    @staticmethod
    def forward(ctx, x, centred, gamma, beta, shift, delta, variance, epsilon, view):
        channels = view[1]
        half = x.dtype in (torch.float16, torch.bfloat16)
        mean = (shift + delta) if half else delta
        # The statistics' own x − shift (`Moments.centred`): one pass fewer.
        d = x if half else (x - shift if centred is None else centred)
        d = d.reshape(view)
        mean, variance = mean.reshape(channels), variance.reshape(channels)
        y = torch.batch_norm(
            d, _flat(gamma, channels), _flat(beta, channels), mean, variance, False, 0.0, epsilon, False
        )
        ctx.save_for_backward(d, _flat(gamma, channels), mean, torch.rsqrt(variance + epsilon))
        ctx.epsilon = epsilon
        ctx.shapes = (x.shape, None if gamma is None else gamma.shape, None if beta is None else beta.shape)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        d, gamma, mean, inv = ctx.saved_tensors
        x_shape, gamma_shape, beta_shape = ctx.shapes
        dx, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            dy.reshape(d.shape).to(d.dtype),
            d,
            gamma,
            None,
            None,
            mean,
            inv,
            True,
            ctx.epsilon,
            [True, gamma_shape is not None, beta_shape is not None],
        )
        dgamma = None if gamma_shape is None else dgamma.reshape(gamma_shape)
        dbeta = None if beta_shape is None else dbeta.reshape(beta_shape)
        return dx.reshape(x_shape), None, dgamma, dbeta, None, None, None, None, None


class _ClosedForm(torch.autograd.Function):
    """`kerasbn.ops.normalize.normalize` in torch ops, for inductor to fuse (see the module doc)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, shift, delta, variance, epsilon, count):
        dtype = variance.dtype
        inv = torch.rsqrt(variance + epsilon)
        a = inv if gamma is None else inv * gamma
        y = (x.to(dtype) - shift - delta) * a
        if beta is not None:
            y = y + beta
        ctx.save_for_backward(x, gamma, shift, delta, inv, count)
        ctx.flags = (gamma is not None, beta is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gamma, shift, delta, inv, count = ctx.saved_tensors
        has_gamma, has_beta = ctx.flags
        dtype = inv.dtype
        dy = dy.to(dtype)
        d = x.to(dtype) - shift
        axes = [i for i, n in enumerate(inv.shape) if n == 1 and x.shape[i] != 1]
        db = dy.sum(axes, keepdim=True)
        # Σdy·x̂ = (Σdy·d − δ·Σdy)·inv, as in `kerasbn.ops.normalize`.
        dg = ((dy * d).sum(axes, keepdim=True) - delta * db) * inv
        a = inv if gamma is None else inv * gamma
        k2 = a * inv * dg / count
        k0 = a * db / count - k2 * delta
        dx = (a * dy - k2 * d - k0).to(x.dtype)
        return dx, dg if has_gamma else None, db if has_beta else None, None, None, None, None, None


def fused_normalize(x, stats, gamma, beta, epsilon: float):
    """`kerasbn.ops.normalize.normalize`: torch's kernels eagerly, the closed form under `torch.compile`."""
    shift, delta, variance = (s.detach() for s in (stats.shift, stats.delta, stats.variance))
    if _compiling():
        return _ClosedForm.apply(x, gamma, beta, shift, delta, variance, epsilon, stats.count.detach())
    view = _kernel_shape(x, variance)
    centred = None if stats.centred is None else stats.centred.detach()
    return _Kernels.apply(x, centred, gamma, beta, shift, delta, variance, epsilon, view)


def fused_inference(x, mean, variance, gamma, beta, epsilon: float):
    """``(x − mean)·γ/√(var + ε) + β``, the statistics broadcastable against ``x``.

    Eagerly one kernel for half-precision data (it computes in float32).
    For float32 the subtraction comes first, since the kernel's own
    ``x·a + b`` rounds at the scale of the offset: ``d = x − mean``, then
    ``β + d·a`` written over ``d`` where no gradient is recorded (`predict`,
    `torch.no_grad`): each eager op is a pass, and each new tensor of this
    size costs page faults (docs/benchmarks.md). Under `torch.compile` plain
    ops, which inductor fuses into one pass.
    """
    a = torch.rsqrt(variance + epsilon)
    if gamma is not None:
        a = a * gamma
    if _compiling():
        y = (x.to(variance.dtype) - mean) * a
        return y if beta is None else y + beta
    if x.dtype in (torch.float16, torch.bfloat16):
        view = _kernel_shape(x, variance)
        channels = view[1]
        y = torch.batch_norm(
            x.reshape(view),
            _flat(gamma, channels),
            _flat(beta, channels),
            mean.reshape(channels),
            variance.reshape(channels),
            False,
            0.0,
            epsilon,
            False,
        )
        return y.reshape(x.shape)
    d = x - mean
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (d, a, beta)):
        return d * a if beta is None else torch.addcmul(beta, d, a)
    return d.mul_(a) if beta is None else torch.addcmul(beta, d, a, out=d)
