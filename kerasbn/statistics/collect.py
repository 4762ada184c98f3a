"""Per-feature statistics of the inputs of BN layers, gathered in forward passes over data.

Every BN is found at any depth (`find_batch_norms`, through nested models
and custom layers alike), and observed by temporarily replacing its
``call`` with a hook on the instance, restored afterwards: the hook sees the
layer's input however the model reaches the layer, so it needs no
functional graph. The model runs with ``training=False`` (dropout and
friends in inference); each hook either keeps the layer in inference or, for
Algorithm 2 as written, normalizes with the batch's own statistics.

Each mini-batch's mean and biased variance per feature are computed in
float64 (inside the compiled function on TensorFlow, on the host for other
backends) and accumulated on the host as Algorithm 2's averages over
mini-batches (`Moments`), so memory is one batch of activations.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from kerasbn.errors import KerasbnError
from kerasbn.folding import plan

INFERENCE = "inference"  # the hook leaves the layer as it is (moving statistics)
BATCH = "batch"  # the hook normalizes with the mini-batch's statistics (Algorithm 1)


@dataclass(frozen=True)
class BNSite:
    """One BN layer of a model.

    Attributes:
        layer: The layer object.
        path: ``outer/inner/…/name`` through nested models and custom layers.
    """

    layer: keras.layers.Layer
    path: str


def find_batch_norms(model: keras.Model) -> list[BNSite]:
    """Every BN layer of ``model`` (Keras's and kerasbn's), nested ones included, each once."""
    sites: list[BNSite] = []
    seen: set[int] = set()

    def walk(layer: keras.layers.Layer, prefix: str) -> None:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            if plan.is_bn(child):
                sites.append(BNSite(child, path))
            else:
                walk(child, f"{path}/")

    walk(model, "")
    return sites


@dataclass
class Moments:
    """Algorithm 2's averages over mini-batches for one BN, in float64.

    ``E[x] = Σ_B m_B·μ_B / Σ_B m_B`` and ``Var[x] = Σ_B m_B·(m_B/(m_B−1))·σ²_B / Σ_B m_B``
    with ``m_B`` the values per feature in batch B (samples × positions): with
    equal batches these are ``E_B[μ_B]`` and ``m/(m−1)·E_B[σ²_B]``; a last,
    smaller batch counts in proportion to its size. A batch with ``m_B = 1``
    has no variance and enters the mean only.
    """

    batches: int = 0
    values: float = 0.0
    mean_sum: np.ndarray | float = 0.0
    variance_values: float = 0.0
    variance_sum: np.ndarray | float = 0.0

    def add(self, m: float, mean: np.ndarray, variance: np.ndarray) -> None:
        self.batches += 1
        self.values += m
        self.mean_sum = self.mean_sum + m * np.asarray(mean, np.float64)
        if m > 1:
            self.variance_values += m
            self.variance_sum = self.variance_sum + m * (m / (m - 1.0)) * np.asarray(variance, np.float64)

    @property
    def mean(self) -> np.ndarray:
        return self.mean_sum / self.values

    @property
    def variance(self) -> np.ndarray:
        return self.variance_sum / self.variance_values


def feature_axes(layer: keras.layers.Layer, rank: int) -> list[int]:
    return plan.bn_axes(layer, rank)


def batch_moments(layer: keras.layers.Layer, x: Any) -> tuple[Any, Any, Any]:
    """``(m, μ_B, σ²_B)`` of one input batch, float64, shaped like the layer's weights.

    Traced ops on TensorFlow (float64 is native there); NumPy on the host
    elsewhere (JAX computes float64 only with x64 enabled).
    """
    rank = len(x.shape)
    axes = feature_axes(layer, rank)
    reduce = tuple(a for a in range(rank) if a not in axes)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        x64 = tf.cast(x, tf.float64)
        features = 1
        for a in axes:
            features *= x.shape[a]
        m = tf.cast(tf.size(x64), tf.float64) / features
        mean = tf.reduce_mean(x64, axis=reduce)
        centred = x64 - tf.reduce_mean(x64, axis=reduce, keepdims=True)
        variance = tf.reduce_mean(tf.square(centred), axis=reduce)
        return m, mean, variance
    x64 = np.asarray(keras.ops.convert_to_numpy(x), np.float64)
    m = float(x64.size // np.prod([x64.shape[a] for a in axes]))
    mean = x64.mean(axis=reduce)
    variance = np.square(x64 - x64.mean(axis=reduce, keepdims=True)).mean(axis=reduce)
    return m, mean, variance


def _batch_normalized(layer: keras.layers.Layer, x: Any, mean: Any, variance: Any) -> Any:
    """Algorithm 1's output with the batch statistics, computed in float64 and rounded once.

    In float32, ``x − μ_B`` would round μ_B to the precision of the offset of
    x, a shift shared by the whole feature that later layers' statistics
    inherit; float64 leaves only the final rounding.
    """
    rank = len(x.shape)
    axes = feature_axes(layer, rank)
    shape = [x.shape[a] if a in axes else 1 for a in range(rank)]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        def bcast(v: Any) -> Any:
            return tf.reshape(tf.cast(v, tf.float64), shape)

        y = (tf.cast(x, tf.float64) - bcast(mean)) * tf.math.rsqrt(bcast(variance) + layer.epsilon)
        if layer.scale:
            y = y * bcast(layer.gamma)
        if layer.center:
            y = y + bcast(layer.beta)
        return tf.cast(y, layer.compute_dtype)

    def host(v: Any) -> np.ndarray:
        return np.reshape(np.asarray(keras.ops.convert_to_numpy(v), np.float64), shape)

    x64 = np.asarray(keras.ops.convert_to_numpy(x), np.float64)
    y = (x64 - host(mean)) / np.sqrt(host(variance) + layer.epsilon)
    if layer.scale:
        y = y * host(layer.gamma)
    if layer.center:
        y = y + host(layer.beta)
    return keras.ops.convert_to_tensor(y.astype(layer.compute_dtype))


class _Stop(Exception):
    """Ends an eager forward pass once the observed layer has been seen."""


@contextlib.contextmanager
def hooked(
    sites: Sequence[BNSite],
    behaviour: str,
    record: set[int],
    captured: dict[int, list],
    *,
    order: list[int] | None = None,
    stop_after: int | None = None,
) -> Iterator[None]:
    """Replace each BN's ``call`` with a hook for the duration of the block.

    Args:
        sites: The BN layers (indices below refer to this list).
        behaviour: `INFERENCE` or `BATCH` normalization in the hooked pass.
        record: Indices whose per-batch moments go into ``captured[i]``.
        captured: Filled with ``(m, mean, variance)`` per call.
        order: If given, each index is appended at its layer's first call.
        stop_after: In an eager pass, stop the pass after this index is recorded.
    """
    originals = []
    for index, site in enumerate(sites):
        layer = site.layer
        original = layer.call

        def hook(inputs, *args, _index=index, _layer=layer, _original=original, **kwargs):
            if order is not None and _index not in order:
                order.append(_index)
            stats = None
            if _index in record or behaviour == BATCH:
                stats = batch_moments(_layer, inputs)
            if _index in record:
                captured.setdefault(_index, []).append(stats)
                if stop_after == _index:
                    raise _Stop
            if behaviour == BATCH:
                return _batch_normalized(_layer, inputs, stats[1], stats[2])
            return _original(inputs, *args, **kwargs)

        # An instance attribute shadows the class's method in Layer.__call__;
        # object.__setattr__ keeps Keras's attribute tracking out of it.
        object.__setattr__(layer, "call", hook)
        originals.append(layer)
    try:
        yield
    finally:
        for layer in originals:
            object.__delattr__(layer, "call")


def _observe_step(model: keras.Model, sites: Sequence[BNSite], behaviour: str, wanted: set[int], batch: Any) -> dict:
    captured: dict[int, list] = {}
    with hooked(sites, behaviour, wanted, captured):
        model(batch, training=False)
    return {str(i): captured.get(i, []) for i in wanted}


def observe(
    model: keras.Model,
    sites: Sequence[BNSite],
    batches: Any,
    *,
    behaviour: str,
    record: Sequence[int],
    on_batch: Callable[[], None] | None = None,
) -> dict[int, Moments]:
    """One pass over ``batches``: Algorithm 2's `Moments` of the inputs of the BNs in ``record``.

    The other BNs run as ``behaviour`` says. On TensorFlow the pass is one
    compiled function whose outputs are only the recorded statistics (the
    rest of the network after the last recorded layer is pruned by the
    graph optimizer); on other backends it runs eagerly and stops early after
    a single recorded layer.
    """
    wanted = set(record)
    moments = {i: Moments() for i in record}
    eager_stop = next(iter(wanted)) if len(wanted) == 1 and behaviour == INFERENCE else None
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One trace per pass: the batch axis is left open, so a last smaller batch reuses it. A partial, not
        # a closure: TensorFlow counts traces by the function's code object and, after five passes (one
        # per BN), would warn on stderr of "retracing" that is by design.
        spec = keras.tree.map_structure(lambda a: tf.TensorSpec((None, *a.shape[1:]), a.dtype), batches.first(1))
        step = functools.partial(_observe_step, model, sites, behaviour, wanted)
        compiled = tf.function(step, input_signature=[spec])
        for batch in batches:
            out = compiled(batch)
            for key, calls in out.items():
                for m, mean, variance in calls:
                    moments[int(key)].add(float(m), mean.numpy(), variance.numpy())
            if on_batch is not None:
                on_batch()
        return moments
    for batch in batches:
        captured: dict[int, list] = {}
        with hooked(sites, behaviour, wanted, captured, stop_after=eager_stop):
            try:
                model(batch, training=False)
            except _Stop:
                pass
        for i, calls in captured.items():
            for m, mean, variance in calls:
                moments[i].add(float(m), np.asarray(mean), np.asarray(variance))
        if on_batch is not None:
            on_batch()
    return moments


def call_order(model: keras.Model, sites: Sequence[BNSite], batch: Any) -> list[int]:
    """Indices of ``sites`` in the order the layers are first called in a forward pass on ``batch``."""
    order: list[int] = []

    def run(x: Any) -> Any:
        with hooked(sites, INFERENCE, set(), {}, order=order):
            return model(x, training=False)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Traced, not eager: TensorFlow's CPU kernels have no eager channels_first convolution.
        run = tf.function(run)
    run(batch)
    return order


def population(moments: Moments, site: BNSite) -> tuple[np.ndarray, np.ndarray]:
    """``(E[x], Var[x])`` for one BN; raises `KerasbnError` if no batch had two values per feature."""
    if moments.batches == 0:
        raise KerasbnError(f"BN layer '{site.path}' was not called on the data")
    if moments.variance_values == 0:
        raise KerasbnError(
            f"too few samples: BN layer '{site.path}' saw one value per feature in every mini-batch, "
            "so m/(m−1) is undefined; give more samples (or a larger --batch-size)"
        )
    return moments.mean, moments.variance
