"""The oracle checks itself: the paper's gradient against finite differences."""

import numpy as np
import pytest

from tests import reference


@pytest.mark.parametrize("shape,axis", [((6, 3), -1), ((4, 3, 5), 1), ((3, 2, 2, 4), [1, 3])])
def test_backward_matches_finite_differences(shape, axis):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) + 3.0
    dy = rng.normal(size=shape)
    feature_shape = tuple(shape[a % len(shape)] for a in sorted({a % len(shape) for a in np.atleast_1d(axis)}))
    gamma = rng.uniform(0.5, 1.5, size=feature_shape)
    dx, _, _ = reference.backward(x, dy, axis, gamma=gamma)

    def loss(v):
        return np.sum(reference.algorithm1(v, axis, gamma=gamma)[0] * dy)

    h = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        numeric[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-5, atol=1e-7)


def test_unbiased_update_is_sample_variance():
    x = np.array([[1.0], [2.0], [6.0]])
    _, mu, var, m = reference.algorithm1(x, -1)
    new_mean, new_var = reference.moving_update(0.0, 0.0, mu, var, m, momentum=None)
    assert new_mean.item() == pytest.approx(3.0)
    assert new_var.item() == pytest.approx(np.var(x, ddof=1))
