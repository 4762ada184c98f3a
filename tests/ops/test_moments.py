"""`kerasbn.ops.moments` against Algorithm 1 in float64 on the same float32 inputs.

The bound on the variance is `reference.variance_tolerance`: 8 units of
float32 rounding times the condition number ``1 + (μ − shift)²/σ²`` of the
shifted one-pass form, computed from the shift `moments` returns; the shift
itself must keep that number near 1 (it estimates the mean), so the bound is
that of a float32 two-pass computation.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kerasbn.ops.moments import moments
from tests import reference
from tests.conftest import BACKEND, MODES, in_mode, tensor

OFFSETS = [0.0, 1.0, -1.0, 1e3, -1e3, 1e5]
SCALES = [1e-3, 1.0, 10.0, 1e3]


def run_moments(x, axes, mode, mask=None):
    """(shift, mean, variance) of ``moments`` in ``mode``, as float64 NumPy."""

    def fn(t, w):
        stats = moments(t, axes, mask=w)
        return stats.shift, stats.mean, stats.variance

    out = in_mode(fn, mode)(tensor(x), tensor(mask))
    return [np.asarray(keras.ops.convert_to_numpy(o), np.float64) for o in out]


def check(x, axes, shift, mean, variance, mask=None):
    features = tuple(a for a in range(x.ndim) if a not in axes)
    _, mu, var, _ = reference.algorithm1(x, features, mask=mask)
    sigma = np.sqrt(var)
    assert np.all(np.abs(mean - mu) <= reference.UNIT * np.abs(mu) + 8 * reference.UNIT * sigma)
    tolerance = reference.variance_tolerance(mu, var, shift)
    spread = var > 0
    assert np.all(np.abs(variance - var)[spread] <= (tolerance * var)[spread])
    assert np.all(variance[~spread] == 0.0)
    # The shift estimates the mean: the condition number stays that of a two-pass.
    assert np.all((tolerance / reference.variance_tolerance(mu, var))[spread] <= 2.0)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 300),
    spatial=st.lists(st.integers(1, 24), min_size=0, max_size=2),
    channels=st.integers(1, 5),
    channels_first=st.booleans(),
    offset=st.sampled_from(OFFSETS),
    scale=st.sampled_from(SCALES),
    seed=st.integers(0, 2**32 - 1),
)
def test_moments_property(batch, spatial, channels, channels_first, offset, scale, seed):
    shape = [batch, *spatial]
    shape.insert(1 if channels_first else len(shape), channels)
    feature = 1 if channels_first else len(shape) - 1
    axes = tuple(a for a in range(len(shape)) if a != feature)
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * scale + offset).astype("float32")
    check(x, axes, *run_moments(x, axes, MODES[-1]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_masked_moments_ignore_far_padding(offset, mode):
    """Padding at 1e4 from the data, on every position a strided sample reads, stays out."""
    rng = np.random.default_rng(3)
    shape = (64, 40, 3)
    x = (rng.normal(size=shape) * 2.0 + offset).astype("float32")
    mask = np.ones(shape[:-1] + (1,), "float32")
    mask[::4] = 0.0
    mask[:, ::5] = 0.0
    x[np.broadcast_to(mask == 0, shape)] = offset + 1e4
    shift, mean, variance = run_moments(x, (0, 1), mode, mask=mask)
    check(x, (0, 1), shift, mean, variance, mask=mask[..., 0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (1e3, 1e-3), (-1e5, 10.0)], ids=["centred", "far", "farther"])
@pytest.mark.parametrize(
    "shape,feature",
    [((300, 4), 1), ((40, 3, 9), 1), ((8, 6, 6, 3), 3), ((32, 5, 2), 2), ((7, 30, 2), 2)],
    ids=["dense-300", "channels-first-40", "nhwc-8", "nwc-32", "batch-7"],
)
def test_moments_in_every_mode_and_batch_layout(shape, feature, offset, scale, mode):
    """Every mode (the property test runs the last one) on batches whose sums take leading blocks of
    several sizes, or none (a batch of 7): eager torch sums over those blocks in one kernel pass."""
    rng = np.random.default_rng(6)
    x = (rng.normal(size=shape) * scale + offset).astype("float32")
    axes = tuple(a for a in range(len(shape)) if a != feature)
    check(x, axes, *run_moments(x, axes, mode))


@pytest.mark.parametrize("mode", MODES)
def test_ghost_batch_groups_each_get_their_own_shift(mode):
    """Groups (a kept leading axis) at offsets 1e5 apart: each is exact on its own."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 16, 12, 4)).astype(np.float64)
    x = (x + np.array([0.0, 1e3, 1e5])[:, None, None, None]).astype("float32")
    axes = (1, 2)
    shift, mean, variance = run_moments(x, axes, mode)
    check(x, axes, shift, mean, variance)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="shapes only known at run time exist on TensorFlow")
@pytest.mark.parametrize("jit", [False, True], ids=["function", "xla"])
def test_moments_with_a_batch_size_known_only_at_run_time(jit):
    import tensorflow as tf

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(300, 7, 3)) + 1e3).astype("float32")
    spec = tf.TensorSpec((None, 7, 3), tf.float32)

    @tf.function(input_signature=[spec], jit_compile=jit)
    def fn(t):
        stats = moments(t, (0, 1))
        return stats.shift, stats.mean, stats.variance

    shift, mean, variance = [np.asarray(o, np.float64) for o in fn(tf.constant(x))]
    check(x, (0, 1), shift, mean, variance)
