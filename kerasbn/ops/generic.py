"""Plain Keras ops: the arrangements for a backend without its own module.

`kerasbn.ops.tensorflow` and `kerasbn.ops.jax` replace some of these with
what their compilers need; any other Keras backend runs these as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import ops


def sums(values: Sequence, axes: Sequence[int], exact: bool = True) -> list:
    """``[Σ v over axes (keepdims) for v in values]``.

    ``exact`` asks for sums good to float32 rounding of the result (the
    statistics) rather than a gradient's accuracy; a plain reduction is
    taken to be both here.
    """
    return [ops.sum(v, axis=axes, keepdims=True) for v in values]


def materialize(x):
    """``x``, computed once before its consumers (a hint where the compiler takes one)."""
    return x


def all_reduce_sums(*sums):
    """Per-replica sums added over all replicas: no replicas here."""
    return sums


def all_reduce_moments(shift, s1, s2, count):
    """Global ``(shift, Σd, Σd², m)`` from per-replica shifted sums: no replicas here."""
    return shift, s1, s2, count


def fused_available(x, feature_axes: Sequence[int], synchronized: bool) -> bool:
    """Whether the backend's fused normalization kernels can run: none here."""
    return False
