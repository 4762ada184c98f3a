"""Cross-replica reduction of shifted batch sums.

TensorFlow's `tf.distribute` runs one copy of the step per replica, so the
per-replica sums have to be all-reduced. Each replica shifted its data by its
own sample; the sums are first moved to one common shift (the replicas' mean
shift) so that the all-reduced sums stay small and the large-offset guarantee
of `kerasbn.ops.moments` holds for the global batch too.

On JAX, `keras.distribution` compiles one SPMD program over the global batch:
the reductions in `moments` are already global and XLA inserts the
all-reduce itself, so nothing is needed here.
"""

from __future__ import annotations

from keras import backend


def _replica_context():
    """The `tf.distribute` replica context when it spans several replicas."""
    if backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def all_reduce_sums(*sums):
    """Per-replica sums added over all replicas (the gradient's Σdy, Σdy·x̂)."""
    ctx = _replica_context()
    if ctx is None:
        return sums
    import tensorflow as tf

    return tuple(ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(sums)))


def all_reduce_moments(shift, s1, s2, count):
    """Global ``(shift, Σd, Σd², m)`` from per-replica shifted sums."""
    ctx = _replica_context()
    if ctx is None:
        return shift, s1, s2, count
    import tensorflow as tf

    count = count * tf.ones_like(s1)
    common = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, shift)
    move = tf.cast(shift - common, s1.dtype)
    s2 = s2 + 2.0 * move * s1 + count * move * move
    s1 = s1 + count * move
    s1, s2, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [s1, s2, count])
    return common, s1, s2, count
