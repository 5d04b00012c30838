"""Batchers: requests in, model-ready batches out.

The first batcher, `FixedBatcher`, takes requests in arrival order, `batch_size` at a time,
and pads each batch to its longest request (right padding: `[PAD]` ids, type 0, mask 0). A
dynamic batcher (a deadline, a token budget) or a padding-free packer replaces it behind the
same `batches(requests) -> Iterator[Batch]` contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from bertrt.padding import length_mask, pad_rows
from bertrt.serve.workload import Request


@dataclass
class Batch:
    """Model inputs for several requests, and what they cost.

    `inputs` holds `input_ids`, `attention_mask`, `token_type_ids`: (B, S) int64, right-padded.
    """

    inputs: dict[str, np.ndarray]
    #: (B,) real (non-padding) tokens per sequence.
    lengths: np.ndarray

    @property
    def size(self) -> int:
        """Sequences in the batch (B)."""
        return int(self.lengths.shape[0])

    @property
    def seq_len(self) -> int:
        """The padded length (S)."""
        return int(self.inputs["input_ids"].shape[1])

    @property
    def tokens(self) -> int:
        """Real tokens: the sum of the lengths."""
        return int(self.lengths.sum())

    @property
    def positions(self) -> int:
        """Padded positions computed: B × S."""
        return self.size * self.seq_len


def pad_batch(requests: Sequence[Request], pad_id: int = 0) -> Batch:
    """One right-padded batch from `requests` (padded to the longest)."""
    if not requests:
        raise ValueError("pad_batch: no requests")
    if len(requests) == 1:  # nothing to pad: views of the request's own rows
        (one,) = requests
        ids = np.asarray(one.input_ids, dtype=np.int64)[None]
        return Batch({"input_ids": ids, "attention_mask": np.ones_like(ids),
                      "token_type_ids": np.asarray(one.token_type_ids, dtype=np.int64)[None]},
                     np.array([ids.shape[1]], dtype=np.int64))
    lengths = np.array([r.length for r in requests], dtype=np.int64)
    inputs = {"input_ids": pad_rows([r.input_ids for r in requests], fill=pad_id),
              "attention_mask": length_mask(lengths).astype(np.int64),
              "token_type_ids": pad_rows([r.token_type_ids for r in requests])}
    return Batch(inputs, lengths)


class FixedBatcher:
    """`batch_size` requests per batch, in order, padded to the longest of each batch.

    A finite stream ends with a smaller batch (its remainder); an endless one never ends.
    """

    def __init__(self, batch_size: int, pad_id: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.pad_id = pad_id

    def batches(self, requests: Iterable[Request]) -> Iterator[Batch]:
        pending: list[Request] = []
        for request in requests:
            pending.append(request)
            if len(pending) == self.batch_size:
                yield pad_batch(pending, self.pad_id)
                pending = []
        if pending:
            yield pad_batch(pending, self.pad_id)
