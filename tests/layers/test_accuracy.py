"""The batch statistics meet issue #12's accuracy targets in every execution mode.

Against Algorithm 1 in float64 on the same float32 inputs: relative error of
the batch variance within `reference.variance_tolerance` (8 units of float32
rounding, ≈ 4.8e-7) for m up to 10⁶ per feature, at offsets 0, 1, 10³, 10⁵
with scales 1 and 10 and at offset 0 with scales 10⁻³ and 10³; never worse
than Keras's layer on the same data once above the rounding floor; the
output within 1e-5. The layer stores the batch
variance as it is with ``momentum=0`` and ``unbiased=False``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kerasbn
from tests import reference
from tests.conftest import MODES, run

GRID = [(0.0, 1.0), (1.0, 1.0), (1e3, 1.0), (1e5, 1.0), (0.0, 10.0), (1.0, 10.0), (1e3, 10.0), (1e5, 10.0)]
GRID += [(0.0, 1e-3), (0.0, 1e3)]
# (shape, axis): issue #12's case (m = 90, axis 1), a feature map (m = 10⁴),
# channels-first (m = 10⁵) and m = 10⁶ per feature.
SHAPES = {
    "issue12": ((5, 3, 3, 2), 1),
    "nhwc": ((16, 25, 25, 4), -1),
    "nchw": ((40, 4, 50, 50), 1),
    "million": ((1_000_000, 2), -1),
}

# Relative error that a float32 variance reaches by chance of rounding alone
# (the stored result rounds by u/2, each square by u): 4 units, ≈ 2.4e-7.
FLOOR = 4 * reference.UNIT


def batch_variance(layer, x, mode):
    """The layer's output and its batch variance: with momentum 0 the moving variance is the last batch's."""
    y = run(layer, x, training=True, mode=mode)
    return y, np.asarray(layer.moving_variance, np.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", SHAPES)
def test_batch_variance_meets_the_targets(case, mode):
    shape, axis = SHAPES[case]
    rng = np.random.default_rng(12)
    # One layer of each across the grid: compiled once, called as a training loop calls it.
    ours = kerasbn.BatchNormalization(axis=axis, momentum=0.0, unbiased=False)
    keras_bn = keras.layers.BatchNormalization(axis=axis, momentum=0.0)
    worst = []
    for offset, scale in GRID:
        x = (rng.normal(size=shape) * scale + offset).astype("float32")
        expected, mu, var, _ = reference.algorithm1(x, axis, eps=1e-3)
        var = var.ravel()
        y, mine = batch_variance(ours, x, mode)
        _, theirs = batch_variance(keras_bn, x, mode)
        error = np.abs(mine - var) / var
        keras_error = np.abs(theirs - var) / var
        worst.append(error.max())
        where = f"offset {offset:g}, scale {scale:g}"
        assert np.all(error <= reference.variance_tolerance(mu, var)), (where, error)
        # Where both layers are at the float32 rounding floor, which one is
        # ahead is chance; above it kerasbn must not be behind.
        assert error.max() <= max(keras_error.max(), FLOOR), (where, error, keras_error)
        if offset <= 1e5 and scale <= 10:
            assert np.abs(y - expected).max() <= 1e-5, where
    assert max(worst) > 0  # the comparison saw float32 results, not a float64 copy
