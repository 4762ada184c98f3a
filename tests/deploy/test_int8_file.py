"""Reading an int8 file's integers: LiteRT's packed INT4 against the schema's layout, written here by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kerasbn.deploy.int8_file import _unpack_int4


@pytest.mark.parametrize("count", [1, 6, 7])
def test_int4_unpacks_two_values_a_byte_low_nibble_first(count):
    values = np.random.default_rng(count).integers(-8, 8, count)
    padded = np.append(values, 0) if count % 2 else values
    # LiteRT's INT4 buffer: element 2i in the low nibble of byte i, element 2i+1 in the high one, two's complement.
    packed = np.array([(a & 0xF) | ((b & 0xF) << 4) for a, b in padded.reshape(-1, 2)], np.uint8)
    np.testing.assert_array_equal(_unpack_int4(packed, count), values)
