"""`kerasbn.ops.dispatch.moment_sums` and `array_ops` against float64 NumPy and `keras.ops`.

``moment_sums`` takes one of three routes on eager torch (a kernel pass over
leading blocks, torch's own sums of a few hundred rows, the blocked `sums`
elsewhere) and the blocked `sums` on the other backends; each must be exact
to float32 rounding of the result, as the statistics' bound assumes
(`tests.reference.variance_tolerance`: 8 units).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasbn.ops import dispatch
from tests import reference
from tests.conftest import MODES, in_mode, tensor

CASES = {
    "nhwc-blocks": ((64, 12, 12, 8), (0, 1, 2)),
    "nchw-blocks": ((16, 4, 12, 12), (0, 2, 3)),
    "dense-rows": ((300, 4), (0,)),
    "ghost-groups": ((2, 16, 12, 12, 8), (1, 2, 3)),
    "prime-batch": ((191, 6, 8), (0, 2)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_moment_sums_match_float64(case, mode, rng):
    shape, axes = CASES[case]
    d = rng.normal(0.3, 1.0, size=shape).astype("float32")
    out = in_mode(lambda t: dispatch.moment_sums(t, axes), mode)(tensor(d))
    got = [np.asarray(keras.ops.convert_to_numpy(o), np.float64) for o in out]
    d64 = d.astype(np.float64)
    for g, v in zip(got, (d64, d64 * d64), strict=True):
        want = v.sum(axis=axes, keepdims=True)
        scale = np.abs(v).sum(axis=axes, keepdims=True)
        assert g.shape == want.shape
        np.testing.assert_array_less(np.abs(g - want), 8 * reference.UNIT * scale)


ARRAY_CALLS = {
    "cast": lambda ops, x: ops.cast(x, "float64"),
    "reshape": lambda ops, x: ops.reshape(x, (-1, 3)),
    "mean": lambda ops, x: ops.mean(x, axis=(0, 1), keepdims=True),
    "maximum-scalar": lambda ops, x: ops.maximum(x, 0.25),
    "maximum-tensor": lambda ops, x: ops.maximum(x, ops.flip(x, axis=0)),
    "stop_gradient": lambda ops, x: ops.stop_gradient(x),
    "shape": lambda ops, x: ops.convert_to_tensor(ops.shape(x)),
}


@pytest.mark.parametrize("call", ARRAY_CALLS, ids=list(ARRAY_CALLS))
def test_array_ops_give_what_keras_ops_give(call, rng):
    x = tensor(rng.normal(size=(4, 5, 3)).astype("float32"))
    want = keras.ops.convert_to_numpy(ARRAY_CALLS[call](keras.ops, x))
    got = keras.ops.convert_to_numpy(ARRAY_CALLS[call](dispatch.array_ops(), x))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_array_ops_read_keras_variables():
    variable = keras.Variable(np.arange(6, dtype="float32").reshape(2, 3))
    fast = dispatch.array_ops()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(fast.reshape(fast.cast(variable, "float64"), (3, 2))),
        np.arange(6, dtype="float64").reshape(3, 2),
    )
