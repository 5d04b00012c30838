"""Ragged id rows to arrays: right-padded (B, S), or packed (T,) with cumulative lengths.

The tokenizer, the training collators and the serve batcher all turn lists of per-sequence ids
into (B, S) arrays padded on the right; they call `pad_rows` (and `length_mask` for the
attention mask) instead of keeping their own loops. Packed (padding-free) models take the rows
one after another instead, `pack_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def length_mask(lengths: Sequence[int] | np.ndarray, seq: int | None = None) -> np.ndarray:
    """(B, S) bool mask, True at the first `lengths[b]` positions of row b.

    Args:
        lengths: Per-row lengths.
        seq: Width S; default the longest length.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max(initial=0)) if seq is None else seq
    return np.arange(width)[None, :] < lengths[:, None]


def pad_rows(rows: Sequence[Sequence[int] | np.ndarray], fill: int = 0,
             seq: int | None = None, dtype: type = np.int64) -> np.ndarray:
    """Right-pad ragged rows into a (B, S) array filled with `fill` past each row's end.

    Args:
        rows: Per-row values (lists or 1-D arrays).
        fill: The padding value (a pad id, 0 for masks and type ids, -100 for ignored labels).
        seq: Width S; default the longest row. A row longer than `seq` is an error.
        dtype: Element type of the result.

    Raises:
        ValueError: a row is longer than `seq`.
    """
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    longest = int(lengths.max(initial=0))
    width = longest if seq is None else seq
    if longest > width:
        raise ValueError(f"pad_rows: a row of length {longest} does not fit in {width}")
    out = np.full((len(rows), width), fill, dtype=dtype)
    if longest:
        out[length_mask(lengths, width)] = np.concatenate(
            [np.asarray(r, dtype=dtype).reshape(-1) for r in rows])
    return out


def pack_rows(rows: Sequence[Sequence[int] | np.ndarray],
              dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Rows one after another, for a packed model.

    Returns:
        The (T,) concatenation, and `cu_seqlens` (B+1,) int32: 0, len0, len0+len1, ..., T.

    Raises:
        ValueError: no rows, or an empty row (a packed batch has no room for one).
    """
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if not len(rows) or (lengths == 0).any():
        raise ValueError("pack_rows: expected at least one row, none of them empty")
    cu = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return np.concatenate([np.asarray(r, dtype=dtype).reshape(-1) for r in rows]), cu
