"""Workloads: where serve-bench's requests come from.

A workload is a list of *shapes* (a batch size, and a sequence length or "real texts") and, for
each shape, an endless stream of `Request`s — one sequence each, unpadded. Batching and padding
are the batcher's job (`bertrt.serve.batcher`), so a dynamic batcher or padding-free execution
consumes the same requests.

- `SyntheticWorkload`: a grid of batch sizes × sequence lengths; every request is exactly
  `seq_len` random valid token ids (`[CLS] ... [SEP]` when the vocabulary is known), so nothing
  is padded.
- `TextWorkload`: real texts, one per line of a UTF-8 file, tokenized with the model's
  tokenizer (truncated to `max_length`); one shape per batch size, each padded to its longest.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bertrt.errors import BertrtError, invalid_utf8_message

if TYPE_CHECKING:
    from bertrt.tokenizer import Tokenizer


@dataclass(frozen=True)
class Request:
    """One sequence to encode: its token ids and token type ids, (L,) int64 each, unpadded."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Shape:
    """A cell of the benchmark: `batch_size` sequences of `seq_len` tokens (None: real texts,
    each batch padded to its longest, in `order`)."""

    batch_size: int
    seq_len: int | None
    #: Real texts only: "arrival" (as they came: live traffic) or "sorted" (the whole queue
    #: sorted by length first, as an offline job can).
    order: str = "arrival"

    @property
    def label(self) -> str:
        if self.seq_len is not None:
            return f"{self.batch_size}x{self.seq_len}"
        return f"{self.batch_size}xtext" + (" sorted" if self.order == "sorted" else "")


class Workload:
    """Shapes, and for each an endless stream of requests (the same stream on every call)."""

    kind: str = "workload"

    def shapes(self) -> list[Shape]:
        raise NotImplementedError

    def requests(self, shape: Shape) -> Iterator[Request]:
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        """A JSON-able description for the report."""
        return {"kind": self.kind, "shapes": [s.label for s in self.shapes()]}


def _positive_ints(values: Sequence[int], what: str) -> list[int]:
    out = [int(v) for v in values]
    if not out or any(v < 1 for v in out):
        raise BertrtError(f"{what}: expected positive integers, got {list(values)}")
    return out


class SyntheticWorkload(Workload):
    """Batch sizes × sequence lengths of random valid token ids (no padding).

    Args:
        batch_sizes: e.g. (1, 8, 32).
        seq_lens: e.g. (32, 128); each must fit `max_positions` when given.
        vocab_size: ids are drawn below this.
        special_ids: ids never drawn at random (specials); drawn ids start above the largest.
        cls_id, sep_id: put at the first and last position when given (as the tokenizer does).
        max_positions: the model's `max_position_embeddings`, to refuse longer sequences.
        seed: the random stream (the same for every shape and every call).
    """

    kind = "synthetic"

    def __init__(self, batch_sizes: Sequence[int], seq_lens: Sequence[int], vocab_size: int,
                 *, special_ids: Sequence[int] = (), cls_id: int | None = None,
                 sep_id: int | None = None, max_positions: int | None = None,
                 seed: int = 0) -> None:
        self.batch_sizes = _positive_ints(batch_sizes, "batch sizes")
        self.seq_lens = _positive_ints(seq_lens, "sequence lengths")
        if max_positions is not None and max(self.seq_lens) > max_positions:
            raise BertrtError(f"sequence length {max(self.seq_lens)} exceeds the model's "
                              f"max_position_embeddings={max_positions}")
        if vocab_size < 1:
            raise BertrtError(f"vocab_size must be positive, got {vocab_size}")
        low = max(special_ids, default=-1) + 1
        # a vocabulary made only of specials still gives valid ids: draw from all of it
        self.low = low if low < vocab_size else 0
        self.vocab_size = int(vocab_size)
        self.cls_id, self.sep_id = cls_id, sep_id
        self.seed = seed

    def shapes(self) -> list[Shape]:
        return [Shape(b, s) for b in self.batch_sizes for s in self.seq_lens]

    def requests(self, shape: Shape) -> Iterator[Request]:
        assert shape.seq_len is not None
        rng = np.random.default_rng(self.seed)
        types = np.zeros(shape.seq_len, dtype=np.int64)
        while True:
            ids = rng.integers(self.low, self.vocab_size, size=shape.seq_len, dtype=np.int64)
            if self.cls_id is not None:
                ids[0] = self.cls_id
            if self.sep_id is not None and shape.seq_len > 1:
                ids[-1] = self.sep_id
            yield Request(ids, types)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "batch_sizes": self.batch_sizes,
                "seq_lens": self.seq_lens, "vocab_size": self.vocab_size}


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """The non-blank lines of a UTF-8 text file (one text per line).

    Raises:
        BertrtError: missing or unreadable file, a line that is not valid UTF-8 (named by its
            number), or no text at all.
    """
    path = Path(path)
    if not path.exists():
        raise BertrtError(f"{path}: no such file (expected a text file, one text per line)")
    if not path.is_file():
        raise BertrtError(f"{path}: not a file (expected a text file, one text per line)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BertrtError(f"{path}: cannot read ({exc.strerror or exc})") from None
    texts: list[str] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BertrtError(invalid_utf8_message(path, number, exc.start)) from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark is not text
        if line.strip():
            texts.append(line)
    if not texts:
        what = "empty" if not data else "has no text (only blank lines)"
        raise BertrtError(f"{path}: {what}; expected one text per line")
    return texts


class TextWorkload(Workload):
    """Real texts tokenized once; each shape cycles through them from the first text.

    Args:
        texts: the texts (see `read_texts`).
        tokenizer: the model's tokenizer.
        batch_sizes: one shape per batch size (and order).
        max_length: truncation length (specials included).
        source: where the texts came from (for the report).
        orders: "arrival" (batches of consecutive texts, as they came: the live-traffic
            case) and/or "sorted" (batches of consecutive texts once all are sorted by
            length: the offline case).
    """

    kind = "texts"
    ORDERS = ("arrival", "sorted")

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer, batch_sizes: Sequence[int],
                 max_length: int, source: str = "texts",
                 orders: Sequence[str] = ("arrival",)) -> None:
        if not texts:
            raise BertrtError(f"{source}: no texts")
        bad = [o for o in orders if o not in self.ORDERS]
        if bad or not orders:
            raise BertrtError(f"--order: expected arrival and/or sorted, got "
                              f"{','.join(orders) or 'nothing'}")
        self.orders = list(dict.fromkeys(orders))
        self.batch_sizes = _positive_ints(batch_sizes, "batch sizes")
        enc = tokenizer(list(texts), max_length=max_length, padding=False, truncation=True)
        self.requests_list = [Request(i, t) for i, t in zip(enc["input_ids"],
                                                            enc["token_type_ids"])]
        self.max_length = max_length
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], tokenizer: Tokenizer,
                  batch_sizes: Sequence[int], max_length: int,
                  orders: Sequence[str] = ("arrival",)) -> TextWorkload:
        return cls(read_texts(path), tokenizer, batch_sizes, max_length, source=str(path),
                   orders=orders)

    @property
    def lengths(self) -> list[int]:
        """Token counts of the texts, in order (specials included, after truncation)."""
        return [r.length for r in self.requests_list]

    def shapes(self) -> list[Shape]:
        return [Shape(b, None, order) for order in self.orders for b in self.batch_sizes]

    def requests(self, shape: Shape) -> Iterator[Request]:
        if shape.order == "sorted":
            return itertools.cycle(sorted(self.requests_list, key=lambda r: r.length))
        return itertools.cycle(self.requests_list)

    def describe(self) -> dict[str, object]:
        lengths = self.lengths
        return {**super().describe(), "source": self.source, "texts": len(lengths),
                "max_length": self.max_length, "mean_tokens": float(np.mean(lengths)),
                "max_tokens": int(max(lengths))}
