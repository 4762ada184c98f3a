"""`kerasbn.ops.dispatch.sums` against float64 NumPy in every execution mode.

The sums take a different route per backend, mode and layout (leading or
inner blocks, one variadic reduction, float64 across blocks); each route must
give the same sums. The cases cover each route: the inner-block gradient
sums under XLA:CPU (a contiguous run of reduced axes, with and without a kept
axis in front), their fallbacks (a run whose size is not a multiple of the
block, reduced axes that are not contiguous) and the single small reduction
of the statistics of few values per feature.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasbn.ops.dispatch import sums
from tests.conftest import MODES, in_mode, tensor

CASES = {
    "nhwc": ((16, 12, 12, 8), (0, 1, 2)),
    "ghost-groups": ((2, 16, 12, 12, 8), (1, 2, 3)),
    "odd-size": ((13, 11, 9, 4), (0, 1, 2)),
    "nchw": ((16, 4, 12, 12), (0, 2, 3)),
    "small": ((8, 6, 4), (0, 1)),
}


def run_sums(values, axes, exact, mode):
    """``sums`` of NumPy arrays in ``mode``, returned as float64 NumPy."""
    fn = in_mode(lambda *v: sums(list(v), axes, exact=exact), mode)
    out = fn(*[tensor(v) for v in values])
    return [np.asarray(keras.ops.convert_to_numpy(o), np.float64) for o in out]


@pytest.mark.parametrize("exact", [True, False], ids=["statistics", "gradient"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_sums_match_float64(case, mode, exact, rng):
    shape, axes = CASES[case]
    dy = rng.normal(size=shape).astype("float32")
    d = rng.normal(1.0, 2.0, size=shape).astype("float32")
    values = [dy, dy * d]
    got = run_sums(values, axes, exact, mode)
    for v, g in zip(values, got, strict=True):
        want = v.astype(np.float64).sum(axis=axes, keepdims=True)
        scale = np.abs(v.astype(np.float64)).sum(axis=axes, keepdims=True)
        assert g.shape == want.shape
        np.testing.assert_array_less(np.abs(g - want), 1e-6 * scale + 1e-30)
