"""The arrangements module of the active Keras backend, imported on first use.

The paper's arithmetic (`kerasbn.ops.moments`, `kerasbn.ops.normalize`) is
written once in Keras ops; what a compiler or a runtime needs besides
(the order of the sums, fused kernels, cross-replica reductions) lives in
`kerasbn.ops.tensorflow`, `kerasbn.ops.jax` or `kerasbn.ops.torch`, with
`kerasbn.ops.generic`
for any other backend. Only the active backend's module is imported, so the
layer never imports TensorFlow on JAX.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

from keras import backend, ops

_MODULES = {"tensorflow": "kerasbn.ops.tensorflow", "jax": "kerasbn.ops.jax", "torch": "kerasbn.ops.torch"}


_LOADED: dict[str, ModuleType] = {}


def module() -> ModuleType:
    """`kerasbn.ops.tensorflow`, `kerasbn.ops.jax`, `kerasbn.ops.torch` or `kerasbn.ops.generic`.

    Looked up in a dict once imported: `torch.compile` cannot trace
    `importlib` and would split the layer's graph at every call.
    """
    name = _MODULES.get(backend.backend(), "kerasbn.ops.generic")
    loaded = _LOADED.get(name)
    if loaded is None:
        loaded = _LOADED[name] = importlib.import_module(name)
    return loaded


def array_ops():
    """`keras.ops`, or the backend's own functions of the same names where Keras's dispatch costs more than the op.

    Only what the statistics and the layer call on every step
    (`kerasbn.ops.torch.array_ops`); any other name is `keras.ops`'s.
    """
    return getattr(module(), "array_ops", ops)


def sums(values: Sequence, axes: Sequence[int], exact: bool = True) -> list:
    """``[Σ v over axes (keepdims) for v in values]``: with ``exact``, good to float32 rounding of the result."""
    return module().sums(values, axes, exact)


def moment_sums(d, axes: Sequence[int]) -> list:
    """``[Σd, Σd²]`` over ``axes`` (keepdims), good to float32 rounding of the result.

    A backend may take both in one pass over ``d`` (`kerasbn.ops.torch`);
    otherwise they are the exact `sums` of ``d`` and ``d·d``.
    """
    own = getattr(module(), "moment_sums", None)
    return sums([d, d * d], axes) if own is None else own(d, axes)


def materialize(x):
    """``x`` computed once, before its consumers."""
    return module().materialize(x)


def all_reduce_sums(*sums):
    """Per-replica sums added over all replicas (`tf.distribute`, `torch.distributed`)."""
    return module().all_reduce_sums(*sums)


def all_reduce_moments(shift, s1, s2, count):
    """Global ``(shift, Σd, Σd², m)`` from per-replica shifted sums."""
    return module().all_reduce_moments(shift, s1, s2, count)


def fused_available(x, feature_axes: Sequence[int], synchronized: bool) -> bool:
    """Whether the backend's fused normalization kernels can run this normalization."""
    return module().fused_available(x, feature_axes, synchronized)


def fused_normalize(x, stats, gamma, beta, epsilon: float):
    """`kerasbn.ops.normalize.normalize` as fused kernels, where `fused_available` says so."""
    return module().fused_normalize(x, stats, gamma, beta, epsilon)


def fused_inference(x, mean, variance, gamma, beta, epsilon: float):
    """``(x − mean)·γ/√(var + ε) + β`` through the backend's kernels, where `fused_available` says so.

    ``mean`` and ``variance`` are float32 and broadcastable against ``x``.
    """
    return module().fused_inference(x, mean, variance, gamma, beta, epsilon)
