"""The shared right-padder against rows written out by hand."""

import numpy as np
import pytest

from bertrt.padding import length_mask, pad_rows


def test_pad_rows_fills_past_each_row():
    out = pad_rows([[5, 6, 7], [8], []], fill=-1)
    np.testing.assert_array_equal(out, [[5, 6, 7], [8, -1, -1], [-1, -1, -1]])
    assert out.dtype == np.int64


def test_pad_rows_to_a_given_width_and_dtype():
    out = pad_rows([np.array([1, 2]), [3]], fill=0, seq=4, dtype=np.int32)
    np.testing.assert_array_equal(out, [[1, 2, 0, 0], [3, 0, 0, 0]])
    assert out.dtype == np.int32


def test_pad_rows_refuses_a_row_longer_than_the_width():
    with pytest.raises(ValueError, match="length 3 does not fit in 2"):
        pad_rows([[1, 2, 3]], seq=2)


def test_length_mask():
    np.testing.assert_array_equal(length_mask([2, 0, 3]),
                                  [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert length_mask([1], seq=4).tolist() == [[True, False, False, False]]
