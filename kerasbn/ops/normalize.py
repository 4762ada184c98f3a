"""The training-mode normalization with the paper's hand-written gradient.

Autodiff through the shifted moments and the normalization costs a dozen
passes over the activations; the paper's closed form needs two reductions
and one elementwise pass:

    dβ = Σ dy,  dγ = Σ dy·x̂,  dx = γ/(m·σ)·(m·dy − dβ − x̂·dγ),
    σ = √(σ²_B + ε).

The statistics enter as stop-gradient inputs and the closed form accounts
for their dependence on ``x``. Two implementations share that contract:

- ``keras.ops.custom_gradient`` around plain ops, for XLA (TF
  ``jit_compile=True``, JAX on any device) and the rarer layouts elsewhere:
  the sums go through `kerasbn.ops.reduce` (variadic reductions in a
  vectorized layout under XLA on CPU) and ``dx`` is one elementwise pass,
  with ``x̂`` recomputed from ``x`` rather than stored.
- On TensorFlow outside XLA on CPU, the fused kernels
  ``FusedBatchNormV3``/``FusedBatchNormGradV3`` (one kernel each way) fed
  with data already shifted by a sample (half-precision data as they are)
  and with the layer's own exact statistics. The fused kernel's own
  statistics are summed sequentially in float32 (measured 8e-5 off in y at
  10⁵ values per feature), so it is run in inference mode forward and only
  its gradient uses ``is_training=True`` with the statistics given as its
  reserve space (its own float32 sums of dy and dy·x̂ are accurate enough
  for a gradient: ≤ 1e-5 relative).

Masks and renorm keep autodiff (see the layer). On GPU the reserve space
means something else (cuDNN's inverse variance and workspace), so the fused
path is only taken when TensorFlow sees no GPU.
"""

from __future__ import annotations

from typing import Sequence

from keras import backend, ops

from kerasbn.ops import distributed
from kerasbn.ops.reduce import in_tf_xla, sums


def tf_fused_available(x, feature_axes: Sequence[int], synchronized: bool) -> bool:
    """Whether TensorFlow's fused CPU kernels can run this normalization.

    Decided when the layer is traced: float32, float16 or bfloat16 data with
    one feature axis, the last, no cross-replica statistics, not inside an
    XLA cluster (XLA expands the fused op into slow generic code), and no GPU.
    """
    if backend.backend() != "tensorflow" or synchronized:
        return False
    if x.dtype not in ("float32", "bfloat16", "float16") or len(x.shape) < 2:
        return False
    if list(feature_axes) != [len(x.shape) - 1]:
        return False
    import tensorflow as tf

    return not in_tf_xla() and not tf.config.list_logical_devices("GPU")


def normalize(x, stats, gamma, beta, epsilon: float, axes: Sequence[int], synchronized: bool = False):
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
            # the reduction loop in scalar code (TF-XLA training step 10.4 ms
            # against 7.2 ms on (32, 56, 56, 64)). δ is a few σ at most, so
            # the difference loses no more than the dx regrouping below.
            db, dd = sums([dy, dy * d], axes, exact=False)
            dg = (dd - delta * db) * inv
            sum_db, sum_dg = distributed.all_reduce_sums(db, dg) if synchronized else (db, dg)
            # dx = a·(dy − dβ/m − x̂·dγ/m) with x̂ = (d − δ)·inv, regrouped
            # into per-feature coefficients: one elementwise pass. d is a
            # few σ at most (shift is a sample), so the regrouping is exact
            # to rounding at the scale of the spread, not of the offset.
            k2 = a * inv * sum_dg / count
            k0 = a * sum_db / count - k2 * delta
            dx = ops.cast(a * dy - k2 * d - k0, x.dtype)
            zero = [ops.zeros_like(t) for t in (shift, delta, inv, count)]
            return (dx, _reduce_to(dg, g), _reduce_to(db, b), *zero)

        return y, grad

    return _normalize(x, g, b, shift, delta, inv, count)


def _reduce_to(grad, like):
    """Sum ``grad`` over the axes that ``like`` broadcasts (ghost batches' groups)."""
    extra = [i for i, (n, k) in enumerate(zip(like.shape, grad.shape)) if n == 1 and k != 1]
    return ops.sum(grad, axis=extra, keepdims=True) if extra else grad


def tf_fused_normalize(x, stats, gamma, beta, epsilon: float):
    """`normalize` through TensorFlow's fused CPU kernels (see the module doc).

    For float32 data the kernels see ``d = x − shift``, a few σ wide whatever
    the offset, so their float32 arithmetic is exact to rounding at the scale
    of the spread; ``∂d/∂x = 1`` leaves the gradient to them. Half-precision
    data go in as they are, with the mean as one float32 value: the kernels
    subtract it in float32, and its rounding (2⁻²⁴ of the mean) is far below
    the data's own spacing there (2⁻⁸ of it in bfloat16, 2⁻¹¹ in float16).
    This saves the float32 copies of x, y, dy and dx: the bfloat16 training
    step on (32, 56, 56, 64) took 7.4 ms against 11.1 ms.
    """
    import tensorflow as tf

    channels = x.shape[-1]
    half = x.dtype in (tf.float16, tf.bfloat16)
    mean = stats.shift + stats.delta if half else stats.delta
    mean = tf.reshape(tf.stop_gradient(mean), [channels])
    variance = tf.reshape(tf.stop_gradient(stats.variance), [channels])
    dtype = variance.dtype
    scale = tf.ones([channels], dtype) if gamma is None else tf.reshape(gamma, [channels])
    offset = tf.zeros([channels], dtype) if beta is None else tf.reshape(beta, [channels])
    # The very subtraction `moments` made (its shift is already a stopped
    # gradient), so that Grappler shares one pass between the two.
    d = x if half else x - stats.shift

    @tf.custom_gradient
    def _fused(d, scale, offset):
        # The kernels take NHWC and every leading axis is reduced: the data
        # are viewed as m images of one pixel, the layout the CPU kernel
        # splits across threads best (1.2 ms against 1.9 ms as one image of
        # m pixels, inference on (32, 56, 56, 64)).
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
            return tf.reshape(dx, tf.shape(d)), dscale, doffset

        return tf.reshape(y, tf.shape(d)), grad

    return _fused(d, scale, offset)


def tf_fused_inference(x, mean, variance, gamma, beta, epsilon: float):
    """``(x − mean)·γ/√(var + ε) + β`` as one fused CPU kernel (TF graph/eager).

    ``x`` may be float16/bfloat16: the kernel computes in float32 and returns
    ``x``'s dtype; ``gamma``, ``beta`` and the statistics are float32.
    """
    import tensorflow as tf

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
