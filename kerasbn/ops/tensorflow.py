"""The TensorFlow arrangements: blocked sums, XLA's variadic reduction,
the fused CPU kernels and `tf.distribute`'s all-reduce.

Sums. TensorFlow's CPU reductions, and XLA as TensorFlow lowers them,
accumulate nearly sequentially, and TF-XLA runs each reduction as its own
loop over the data. The sums are taken in two levels (`kerasbn.ops.reduce`):
float32 partial sums over blocks, then the partials, in float64 for the
statistics. The float64 cast between the levels also keeps XLA from merging
them back. Inside XLA the first level of all the sums is one variadic
reduction over leading axes (one pass over the data for Σd and Σd², a
vectorized loop); Eigen in a graph prefers the innermost axes.

Fused kernels. Outside XLA on CPU, ``FusedBatchNormV3``/
``FusedBatchNormGradV3`` (one kernel each way) are fed data already shifted
by the layer's shift and the layer's own exact statistics. The fused
kernel's own statistics are summed sequentially in float32, so it runs in
inference mode forward, and only its gradient uses ``is_training=True`` with
the statistics given as its reserve space (its own float32 sums of dy and
dy·x̂ are accurate enough for a gradient: ≤ 1e-5 relative). On GPU the
reserve space means something else (cuDNN's inverse variance and
workspace), so the fused path is only taken when TensorFlow sees no GPU;
XLA expands the fused op into slow generic code, so not inside XLA either.

Replicas. `tf.distribute` runs one copy of the step per replica, so the
per-replica sums are all-reduced. Each replica shifted its data by its own
shift; the sums are first moved to one common shift so that the all-reduced
sums stay small and the large-offset guarantee holds for the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla
from tensorflow.python.ops import control_flow_util

from kerasbn.ops import generic, reduce

materialize = generic.materialize


def in_xla() -> bool:
    """Whether the op being traced is inside a TensorFlow XLA cluster."""
    if tf.executing_eagerly():
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def sums(values: Sequence, axes: Sequence[int], exact: bool = True) -> list:
    """``[Σ v over axes (keepdims) for v in values]``, of one shape and dtype.

    ``exact`` (the statistics) adds the partial sums in float64; otherwise
    (the gradient) in the values' dtype.
    """
    axes = sorted(axes)
    xla_cluster = in_xla()
    if not exact and len(values) > 1 and xla_cluster:
        inner = reduce.inner_block_sums(values, axes, variadic_sums)
        if inner is not None:
            return inner
    acc = "float64" if exact else values[0].dtype
    variadic = variadic_sums if xla_cluster else None
    # A nearly sequential float32 sum of 200 values is off by up to 9e-7
    # relative: the statistics take blocks from 2 blocks' worth on.
    small = 2 * reduce.BLOCK if exact else reduce.SMALL
    return reduce.blocked_sums(values, axes, leading=xla_cluster, variadic=variadic, acc=acc, small=small)


_REDUCERS: dict = {}


def variadic_sums(values: Sequence, axes: Sequence[int]) -> list:
    """Keepdims sums of several tensors in one XLA reduction."""
    dtype = values[0].dtype
    key = (dtype, len(values))
    if key not in _REDUCERS:
        n = len(values)

        def add(*args):
            return [a + b for a, b in zip(args[:n], args[n:], strict=True)]

        zero = tf.TensorSpec([], dtype)
        _REDUCERS[key] = tf.function(add).get_concrete_function(*[zero] * (2 * n))
    init = [tf.zeros([], dtype)] * len(values)
    out = xla.variadic_reduce(list(values), init, axes, _REDUCERS[key])
    keep = [1 if a in axes else d for a, d in enumerate(values[0].shape)]
    return [tf.reshape(o, reduce.keepdims_shape(values[0], keep)) for o in out]


# --------------------------------------------------------------------------- replicas


def _replica_context():
    """The `tf.distribute` replica context when it spans several replicas."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def all_reduce_sums(*sums):
    """Per-replica sums added over all replicas (the gradient's Σdy, Σdy·x̂)."""
    ctx = _replica_context()
    if ctx is None:
        return sums
    return tuple(ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(sums)))


def all_reduce_moments(shift, s1, s2, count):
    """Global ``(shift, Σd, Σd², m)`` from per-replica shifted sums.

    Each replica's ``(Σd, Σd²)`` around its own shift is moved to the common
    shift (the replicas' mean shift) by the exact identities
    ``Σ(d + δ) = Σd + mδ`` and ``Σ(d + δ)² = Σd² + 2δΣd + mδ²`` in the sums'
    float64, then added: the parallel combination of Chan et al. (1979) with
    the shifts as block centres.
    """
    ctx = _replica_context()
    if ctx is None:
        return shift, s1, s2, count
    count = count * tf.ones_like(s1)
    common = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, shift)
    move = tf.cast(shift - common, s1.dtype)
    s2 = s2 + 2.0 * move * s1 + count * move * move
    s1 = s1 + count * move
    s1, s2, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [s1, s2, count])
    return common, s1, s2, count


# --------------------------------------------------------------------------- fused kernels


def fused_available(x, feature_axes: Sequence[int], synchronized: bool) -> bool:
    """Whether TensorFlow's fused CPU kernels can run this normalization.

    Decided when the layer is traced: float32, float16 or bfloat16 data with
    one feature axis, the last, no cross-replica statistics, not inside an
    XLA cluster, and no GPU.
    """
    if synchronized or x.dtype not in ("float32", "bfloat16", "float16") or len(x.shape) < 2:
        return False
    if list(feature_axes) != [len(x.shape) - 1]:
        return False
    return not in_xla() and not tf.config.list_logical_devices("GPU")


def fused_normalize(x, stats, gamma, beta, epsilon: float):
    """`kerasbn.ops.normalize.normalize` through the fused CPU kernels.

    For float32 data the kernels see ``d = x − shift``, about σ wide
    whatever the offset, so their float32 arithmetic is exact to rounding at
    the scale of the spread; ``∂d/∂x = 1`` leaves the gradient to them.
    Half-precision data go in as they are, with the mean as one float32
    value: the kernels subtract it in float32, and its rounding (2⁻²⁴ of the
    mean) is far below the data's own spacing there (2⁻⁸ of it in bfloat16,
    2⁻¹¹ in float16). This saves the float32 copies of x, y, dy and dx.
    """
    channels = x.shape[-1]
    half = x.dtype in (tf.float16, tf.bfloat16)
    mean = stats.shift + stats.delta if half else stats.delta
    mean = tf.reshape(tf.stop_gradient(mean), [channels])
    variance = tf.reshape(tf.stop_gradient(stats.variance), [channels])
    dtype = variance.dtype
    scale = tf.ones([channels], dtype) if gamma is None else tf.reshape(gamma, [channels])
    offset = tf.zeros([channels], dtype) if beta is None else tf.reshape(beta, [channels])
    # The very subtraction `moments` made (`Moments.centred`): one pass for
    # both. The kernels' gradient with respect to d is the one to x.
    d = x if half else (x - stats.shift if stats.centred is None else stats.centred)

    @tf.custom_gradient
    def _fused(x, scale, offset):
        # The kernels take NHWC and every leading axis is reduced: the data
        # are viewed as m images of one pixel, the layout the CPU kernel
        # splits across threads best.
        d4 = tf.reshape(d, [-1, 1, 1, channels])
        y = tf.raw_ops.FusedBatchNormV3(
            x=d4, scale=scale, offset=offset, mean=mean, variance=variance, epsilon=epsilon, is_training=False
        )[0]

        def grad(dy):
            dx, dscale, doffset = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=tf.reshape(dy, [-1, 1, 1, channels]),
                x=d4,
                scale=scale,
                reserve_space_1=mean,
                reserve_space_2=variance,
                reserve_space_3=tf.zeros([0], dtype),
                epsilon=epsilon,
                is_training=True,
            )[:3]
            return tf.reshape(dx, tf.shape(x)), dscale, doffset

        return tf.reshape(y, tf.shape(x)), grad

    return _fused(x, scale, offset)


def fused_inference(x, mean, variance, gamma, beta, epsilon: float):
    """``(x − mean)·γ/√(var + ε) + β`` as one fused CPU kernel (TF graph/eager).

    ``x`` may be float16/bfloat16: the kernel computes in float32 and returns
    ``x``'s dtype; ``gamma``, ``beta`` and the statistics are float32.
    """
    channels = x.shape[-1]
    scale = tf.ones([channels]) if gamma is None else tf.reshape(tf.cast(gamma, tf.float32), [channels])
    offset = tf.zeros([channels]) if beta is None else tf.reshape(tf.cast(beta, tf.float32), [channels])
    y = tf.raw_ops.FusedBatchNormV3(
        x=tf.reshape(x, [-1, 1, 1, channels]),
        scale=scale,
        offset=offset,
        mean=tf.reshape(tf.cast(mean, tf.float32), [channels]),
        variance=tf.reshape(tf.cast(variance, tf.float32), [channels]),
        epsilon=epsilon,
        is_training=False,
    )[0]
    return tf.reshape(y, tf.shape(x))
