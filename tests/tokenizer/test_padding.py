"""The shared right-padder against rows written out by hand."""

import numpy as np
import pytest

from bertrt.padding import length_groups, length_mask, pad_rows


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


def _attention_positions(lengths, groups):
    return sum(len(g) * int(np.max(np.asarray(lengths)[g])) ** 2 for g in groups)


def test_length_groups_splits_the_long_from_the_short_when_it_pays():
    lengths = [20, 128, 18, 25, 22, 19, 24]
    groups = length_groups(lengths, min_saving=10.0)
    assert [sorted(g.tolist()) for g in groups] == [[0, 2, 3, 4, 5, 6], [1]]
    # the cut minimizes the padded attention positions over every cut of the sorted lengths
    order = np.argsort(lengths, kind="stable")
    best = min(_attention_positions(lengths, [order[:k], order[k:]]) for k in range(1, 7))
    assert _attention_positions(lengths, groups) == best
    # each index once
    assert sorted(np.concatenate(groups).tolist()) == list(range(7))


def test_length_groups_keeps_a_batch_whole_when_the_saving_is_small():
    for lengths, saving in (([30, 31, 29, 32], 5.0), ([20, 128, 18, 25], 1e6), ([5], 0.0)):
        groups = length_groups(lengths, saving)
        assert [g.tolist() for g in groups] == [list(range(len(lengths)))]
    # the bound: the saving of the best cut against min_saving x the batch's tokens
    lengths = [10, 10, 40]
    saving = 3 * 40 ** 2 - (2 * 10 ** 2 + 40 ** 2)
    assert len(length_groups(lengths, saving / 60)) == 2
    assert len(length_groups(lengths, saving / 60 + 0.01)) == 1
