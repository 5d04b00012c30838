"""A batch's outputs, per sequence, whether the backend padded the batch or packed it.

A backend's `run_sequences` returns one of these, so the engine reads results the same way
from either layout:

- `PaddedOutputs`: per-token outputs (B, S, X), right-padded to the longest sequence;
- `PackedOutputs`: per-token outputs (T, X) of the real tokens only, T = the sum of the
  lengths, sequence b at rows `cu_seqlens[b]:cu_seqlens[b + 1]` (as a packed export returns).

Per-sequence outputs (`pooler_output`, a classifier's `logits`: (B, X)) are the same in both.
`pool(name, mode)` reduces a per-token output over each sequence's real tokens only: `mean`,
`max`, or `cls` (the first token, `[CLS]`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from bertrt.errors import BertrtError
from bertrt.padding import length_mask

#: The ways `pool` reduces a sequence's tokens to one vector.
POOLINGS: tuple[str, ...] = ("mean", "cls", "max")


def check_pooling(mode: Any) -> str:
    """`mode` if it is one of `POOLINGS`.

    Raises:
        BertrtError: anything else (one line listing the choices).
    """
    if mode not in POOLINGS:
        raise BertrtError(f"pooling {mode!r} is unknown; expected one of {', '.join(POOLINGS)}")
    return mode


class SequenceOutputs:
    """Outputs of a batch of B sequences, by name; see the module docstring."""

    def __init__(self, per_token: Mapping[str, np.ndarray],
                 per_sequence: Mapping[str, np.ndarray], lengths: np.ndarray) -> None:
        self.per_token = dict(per_token)
        self.per_sequence = dict(per_sequence)
        #: (B,) real tokens of each sequence.
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def names(self) -> list[str]:
        """Every output's name."""
        return [*self.per_token, *self.per_sequence]

    def _find(self, name: str, per_token: bool) -> np.ndarray:
        table, kind = ((self.per_token, "per-token") if per_token
                       else (self.per_sequence, "per-sequence"))
        if name not in table:
            raise BertrtError(f"the model has no {kind} output {name!r} (it has "
                              f"{', '.join(self.names)})")
        return table[name]

    def _token(self, name: str) -> np.ndarray:
        return self._find(name, per_token=True)

    def sequences(self, name: str) -> np.ndarray:
        """A per-sequence output, (B, X)."""
        return self._find(name, per_token=False)

    def tokens(self, name: str, index: int) -> np.ndarray:
        """A per-token output of sequence `index`, its real tokens only: (L, X)."""
        raise NotImplementedError

    def pool(self, name: str, mode: str) -> np.ndarray:
        """A per-token output reduced over each sequence's real tokens: (B, X) float32."""
        raise NotImplementedError


class PaddedOutputs(SequenceOutputs):
    """Per-token outputs (B, S, X), right-padded: sequence b is real at `[b, :lengths[b]]`."""

    @classmethod
    def from_batch(cls, outputs: Mapping[str, np.ndarray], lengths: np.ndarray,
                   token_outputs: Collection[str] | None = None) -> PaddedOutputs:
        """Split a padded batch's outputs: `token_outputs` are per token, (B, S, ...) (None:
        those of rank 3, (B, S, X)), the rest per sequence."""
        if token_outputs is None:
            token_outputs = [k for k, v in outputs.items() if v.ndim == 3]
        per_token = {k: v for k, v in outputs.items() if k in token_outputs}
        per_sequence = {k: v for k, v in outputs.items() if k not in token_outputs}
        return cls(per_token, per_sequence, lengths)

    def tokens(self, name: str, index: int) -> np.ndarray:
        return self._token(name)[index, : self.lengths[index]]

    def pool(self, name: str, mode: str) -> np.ndarray:
        values = self._token(name)  # (B, S, X)
        if check_pooling(mode) == "cls":
            return np.ascontiguousarray(values[:, 0], dtype=np.float32)
        if (self.lengths == values.shape[1]).all():  # no padding (a single query): no mask
            if mode == "max":
                return values.max(axis=1).astype(np.float32)
            # the mean as one reduction and a division (`ndarray.mean` takes ~2x as long
            # right after a model run, through its Python-level wrapper)
            total = np.add.reduce(values, axis=1, dtype=np.float64)
            return (total / values.shape[1]).astype(np.float32)
        mask = length_mask(self.lengths, values.shape[1])[..., None]
        if mode == "max":
            return np.where(mask, values, -np.inf).max(axis=1).astype(np.float32)
        # padded positions hold whatever the runtime left there: select, never multiply
        total = np.where(mask, values, 0.0).sum(axis=1, dtype=np.float64)
        return (total / np.maximum(self.lengths, 1)[:, None]).astype(np.float32)


class PackedOutputs(SequenceOutputs):
    """Per-token outputs (T, X) of the real tokens, sequence b at `cu_seqlens[b]:cu_seqlens[b+1]`.

    Args:
        per_token: (T, X) arrays by name.
        per_sequence: (B, X) arrays by name.
        cu_seqlens: (B + 1,) cumulative lengths, starting at 0.
    """

    def __init__(self, per_token: Mapping[str, np.ndarray],
                 per_sequence: Mapping[str, np.ndarray], cu_seqlens: np.ndarray) -> None:
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        super().__init__(per_token, per_sequence, np.diff(cu))
        self.cu_seqlens = cu

    @classmethod
    def from_batch(cls, outputs: Mapping[str, np.ndarray], cu_seqlens: np.ndarray,
                   token_outputs: Collection[str] | None = None) -> PackedOutputs:
        """Split a packed batch's outputs: `token_outputs` are per token (None: those with T
        rows, which tells them apart whenever a sequence is longer than one token)."""
        tokens = int(cu_seqlens[-1])
        if token_outputs is None:
            token_outputs = [k for k, v in outputs.items() if v.ndim and v.shape[0] == tokens]
        per_token = {k: v for k, v in outputs.items() if k in token_outputs}
        per_sequence = {k: v for k, v in outputs.items() if k not in token_outputs}
        return cls(per_token, per_sequence, cu_seqlens)

    def tokens(self, name: str, index: int) -> np.ndarray:
        return self._token(name)[self.cu_seqlens[index]: self.cu_seqlens[index + 1]]

    def pool(self, name: str, mode: str) -> np.ndarray:
        values = self._token(name)  # (T, X)
        starts = self.cu_seqlens[:-1]
        if check_pooling(mode) == "cls":
            return np.ascontiguousarray(values[starts], dtype=np.float32)
        if mode == "max":
            return np.maximum.reduceat(values, starts, axis=0).astype(np.float32)
        total = np.add.reduceat(values.astype(np.float64), starts, axis=0)
        return (total / np.maximum(self.lengths, 1)[:, None]).astype(np.float32)
