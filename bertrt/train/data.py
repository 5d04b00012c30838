"""Pre-training data: examples, random-access sources, dynamic masking, and batch layout.

Everything here is a pure function of ``(seed, global example index)``:

* a source maps an index ``i`` to the example at position ``i % len`` of epoch ``i // len``
  (a per-epoch permutation drawn from ``(seed, epoch)``), so any rank can produce any example
  without reading the others and without state to checkpoint beyond the step number;
* ``collate_pretraining`` masks example ``i`` with a generator seeded by ``(seed, i)``, so an
  example is masked the same way whichever rank or batch it lands in, and differently in
  another epoch (its index differs);
* ``batch_indices`` lays the indices of optimizer step ``k`` out over ranks and micro-steps so
  that N ranks at batch b cover the same examples as 1 rank at batch N*b.

Pre-training instances follow BERT's ``create_pretraining_data.py`` (see
``pretraining_source``; ``docs/data.md`` lists the differences).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from bertrt.padding import length_mask, pad_rows
from bertrt.tokenizer import Tokenizer
from bertrt.train.config import check_int
from bertrt.train.corpus import DataError, read_documents

__all__ = [
    "IGNORE_INDEX", "CorpusIndex", "Example", "ExampleSource", "PackedSource",
    "PretrainingSource", "batch_indices", "collate_pretraining", "create_instances",
    "epoch_permutation", "holdout_documents", "index_corpus",
    "mask_example", "pretraining_source", "pretraining_sources", "starts",
]

IGNORE_INDEX = -100
# Stream tags: independent random streams drawn from one user seed.
_TAG_INSTANCES, _TAG_SHUFFLE, _TAG_MASK, _TAG_HOLDOUT = 0x1257, 0x5AFF, 0x3A5C, 0x40D0
_ENCODE_BATCH = 2048  # sentences per tokenizer call


@dataclass
class Example:
    """One model input, unpadded.

    Attributes:
        input_ids: ids with ``[CLS]``/``[SEP]``, ``len <= seq_len``.
        token_type_ids: segment ids, as long as ``input_ids``.
        label: NSP label (0: B is the true continuation of A, 1: B is random), class id, or
            score (a float, regression); -100 when unused.
        tags: tag task: a label per position, -100 at ``[CLS]``, ``[SEP]`` and non-first
            sub-tokens.
        words: word index per position (for whole-word masking), -1 at special tokens.
    """

    input_ids: list[int]
    token_type_ids: list[int]
    label: int | float = IGNORE_INDEX
    tags: list[int] | None = None
    words: list[int] | None = None


@runtime_checkable
class ExampleSource(Protocol):
    """Random-access, deterministic examples.

    ``len(source)`` examples make an epoch; ``source[i]`` accepts any ``i >= 0``: epoch
    ``i // len``, position ``i % len`` of that epoch's permutation (drawn from the seed and the
    epoch). The same ``(seed, i)`` gives the same example in any process or rank.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def starts(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    """The (N+1,) int64 offsets of `sizes` laid end to end: 0, s0, s0+s1, ..., sum."""
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _check_seed(seed: int) -> int:
    return check_int("seed", seed, 0, DataError)


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"example index must be an int, got {type(index).__name__}")
    if index < 0:
        raise IndexError(f"example index must be >= 0, got {index}")
    return int(index)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` examples in ``epoch``: a permutation drawn from ``(seed, epoch)``.

    Returns:
        (n,) int64.
    """
    return np.random.default_rng([seed, _TAG_SHUFFLE, epoch]).permutation(n)


class _EpochOrder:
    """Maps a global index to a position in the example table; caches the current epoch."""

    def __init__(self, seed: int, n: int, shuffle: bool) -> None:
        self.seed, self.n, self.shuffle = seed, n, shuffle
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def __call__(self, index: int) -> int:
        index = _check_index(index)
        epoch, pos = divmod(index, self.n)
        if not self.shuffle:
            return pos
        if epoch != self._epoch:
            self._perm, self._epoch = epoch_permutation(self.seed, epoch, self.n), epoch
        assert self._perm is not None
        return int(self._perm[pos])

    def __getstate__(self) -> dict:
        return {"seed": self.seed, "n": self.n, "shuffle": self.shuffle}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["seed"], state["n"], state["shuffle"])  # type: ignore[misc]


class PackedSource:
    """An ``ExampleSource`` over examples stored as flat arrays (task datasets).

    Args:
        input_ids: (T,) all examples' ids, concatenated.
        token_type_ids: (T,) their type ids.
        offsets: (N+1,) int64, example ``k`` is ``[offsets[k], offsets[k+1])``.
        labels: (N,) per-example label (-100 when unused).
        seed: the shuffle seed.
        tags: (T,) per-position labels, or None.
        words: (T,) per-position word index, or None.
        shuffle: permute each epoch (False: file order, e.g. for evaluation).
    """

    def __init__(self, input_ids: np.ndarray, token_type_ids: np.ndarray, offsets: np.ndarray,
                 labels: np.ndarray, seed: int, tags: np.ndarray | None = None,
                 words: np.ndarray | None = None, shuffle: bool = True) -> None:
        self._ids, self._types, self._offsets = input_ids, token_type_ids, offsets
        self._labels, self._tags, self._words = labels, tags, words
        n = len(offsets) - 1
        if n < 1:
            raise DataError("a source needs at least one example")
        self._order = _EpochOrder(_check_seed(seed), n, shuffle)

    def __len__(self) -> int:
        return self._order.n

    def __getitem__(self, index: int) -> Example:
        k = self._order(index)
        lo, hi = int(self._offsets[k]), int(self._offsets[k + 1])
        return Example(
            input_ids=self._ids[lo:hi].tolist(),
            token_type_ids=self._types[lo:hi].tolist(),
            label=self._labels[k].item(),  # an int, or a float score (regression)
            tags=None if self._tags is None else self._tags[lo:hi].tolist(),
            words=None if self._words is None else self._words[lo:hi].tolist(),
        )


# ------------------------------------------------------------------------- pre-training

@dataclass(frozen=True)
class CorpusIndex:
    """A tokenized corpus, kept compactly.

    Attributes:
        tokens: (T,) int32, every sentence's wordpiece ids, documents and sentences in order.
        sentence_starts: (S+1,) int64 token offset of each sentence (and the end).
        document_starts: (D+1,) int64 sentence offset of each document (and the end).
    """

    tokens: np.ndarray
    sentence_starts: np.ndarray
    document_starts: np.ndarray

    @property
    def num_documents(self) -> int:
        """D."""
        return len(self.document_starts) - 1

    def select(self, documents: Sequence[int] | np.ndarray) -> CorpusIndex:
        """A compact index of the given documents only (in the order given)."""
        docs = np.asarray(documents, dtype=np.int64)
        if len(docs) == 0:
            raise DataError("select: no document given")
        if docs.min() < 0 or docs.max() >= self.num_documents:
            raise DataError(f"select: document index out of range [0, {self.num_documents})")
        tok_parts: list[np.ndarray] = []
        sent_lens: list[np.ndarray] = []
        doc_sizes = np.empty(len(docs), dtype=np.int64)
        for k, d in enumerate(docs):
            s0, s1 = int(self.document_starts[d]), int(self.document_starts[d + 1])
            bounds = self.sentence_starts[s0:s1 + 1]
            tok_parts.append(self.tokens[int(bounds[0]):int(bounds[-1])])
            sent_lens.append(np.diff(bounds))
            doc_sizes[k] = s1 - s0
        return CorpusIndex(np.concatenate(tok_parts), starts(np.concatenate(sent_lens)),
                           starts(doc_sizes))


def holdout_documents(num_documents: int, fraction: float, seed: int) -> np.ndarray:
    """The documents held out for evaluation: ``round(fraction * D)`` of them (at least 1 and
    at most ``D - 1`` when ``fraction > 0``), the head of a permutation drawn from ``seed``.

    A pure function of ``(num_documents, fraction, seed)``: the same in every process.

    Returns:
        (E,) int64 sorted document indices (empty when ``fraction == 0``).

    Raises:
        DataError: ``fraction`` is outside ``[0, 1)``, or it is > 0 with fewer than 2
            documents.
    """
    seed = _check_seed(seed)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"the held-out fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0.0:
        return np.zeros(0, dtype=np.int64)
    if num_documents < 2:
        raise DataError(f"holding out documents for evaluation needs at least 2 documents, "
                        f"the corpus has {num_documents}")
    count = min(max(1, round(fraction * num_documents)), num_documents - 1)
    perm = np.random.default_rng([seed, _TAG_HOLDOUT]).permutation(num_documents)
    return np.sort(perm[:count]).astype(np.int64)


def index_corpus(paths: Sequence[Path], tokenizer: Tokenizer) -> CorpusIndex:
    """Tokenize corpora in one streaming pass (batched), dropping empty sentences and documents.

    Raises:
        DataError: a file is unreadable or malformed, or no file holds any token.
    """
    backend = tokenizer.backend
    token_chunks: list[np.ndarray] = []
    sent_lens: list[np.ndarray] = []
    doc_sizes: list[int] = []  # sentences per document, after dropping empty sentences
    pending: list[str] = []
    pending_docs: list[int] = []  # sentences of each document in `pending`

    def flush() -> None:
        if not pending:
            return
        encs = backend.encode_batch_fast(pending, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        token_chunks.append(np.fromiter(
            itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32,
            count=int(lens.sum())))
        start = 0
        for n in pending_docs:
            doc_lens = lens[start:start + n]
            start += n
            kept = doc_lens[doc_lens > 0]
            if len(kept):
                sent_lens.append(kept)
                doc_sizes.append(len(kept))
        pending.clear()
        pending_docs.clear()

    for path in paths:
        for doc in read_documents(Path(path)):
            pending.extend(doc)
            pending_docs.append(len(doc))
            if len(pending) >= _ENCODE_BATCH:
                flush()
    flush()
    if not doc_sizes:
        names = ", ".join(str(p) for p in paths) or "(no file given)"
        raise DataError(f"{names}: the corpus is empty (no text to build instances from)")
    tokens = np.concatenate(token_chunks)
    sentence_starts = starts(np.concatenate(sent_lens))
    document_starts = starts(doc_sizes)
    assert sentence_starts[-1] == len(tokens)
    return CorpusIndex(tokens, sentence_starts, document_starts)


def _truncate_pair(a: tuple[int, int], b: tuple[int, int], max_tokens: int,
                   rng: np.random.Generator) -> tuple[int, int, int, int]:
    """BERT's ``truncate_seq_pair`` on token ranges: cut the longer segment (B on a tie) one
    token at a time, each from its front or back with probability 1/2, until both fit."""
    (a_lo, a_hi), (b_lo, b_hi) = a, b
    la, lb = a_hi - a_lo, b_hi - b_lo
    excess = la + lb - max_tokens
    if excess <= 0:
        return a_lo, a_hi, b_lo, b_hi
    cut_a = cut_b = 0
    if la > lb:
        cut_a = min(excess, la - lb)
    elif lb > la:
        cut_b = min(excess, lb - la)
    rest = excess - cut_a - cut_b
    cut_b += (rest + 1) // 2  # equal lengths: B first, then they alternate
    cut_a += rest // 2
    front_a = int(rng.binomial(cut_a, 0.5)) if cut_a else 0
    front_b = int(rng.binomial(cut_b, 0.5)) if cut_b else 0
    return a_lo + front_a, a_hi - (cut_a - front_a), b_lo + front_b, b_hi - (cut_b - front_b)


def create_instances(index: CorpusIndex, seq_len: int, seed: int, short_seq_prob: float = 0.1,
                     dupe_factor: int = 1) -> np.ndarray:
    """Sentence-pair instances as BERT's ``create_instances_from_document`` builds them.

    Per document, sentences are gathered into a chunk until it reaches the target length
    (``seq_len - 3``, or with probability ``short_seq_prob`` a random length in
    ``[2, seq_len - 3]``, drawn again for each chunk). The chunk is split at a random sentence
    boundary into A and B; a one-sentence chunk is split at a random token instead, so that
    single-sentence documents still give both labels. With probability 1/2 (always when the
    chunk is one single-token sentence) B is replaced by a span starting at a random sentence of
    a random other document (label 1) and the unused sentences go back to the document;
    otherwise B is the true continuation (label 0). The pair is truncated longest-first to
    ``seq_len - 3``, each cut token from the front or back at random. With a single document,
    "random" spans come from the same document, never starting at the true next sentence.

    Returns:
        (N, 5) int64 rows ``a_start, a_stop, b_start, b_stop, nsp_label`` (token offsets into
        ``index.tokens``).
    """
    max_tokens = seq_len - 3
    rng = np.random.default_rng([seed, _TAG_INSTANCES])
    starts, doc_starts = index.sentence_starts, index.document_starts
    n_docs = index.num_documents
    rows: list[tuple[int, int, int, int, int]] = []

    def target() -> int:
        if rng.random() < short_seq_prob:
            return int(rng.integers(2, max_tokens + 1))
        return max_tokens

    for _ in range(dupe_factor):
        for d in range(n_docs):
            s0, s1 = int(doc_starts[d]), int(doc_starts[d + 1])
            goal = target()
            first, length, i = s0, 0, s0
            while i < s1:
                length += int(starts[i + 1] - starts[i])
                if i == s1 - 1 or length >= goal:
                    lo, hi = int(starts[first]), int(starts[i + 1])
                    if i > first:  # >= 2 sentences: split at a sentence boundary
                        a_end = first + int(rng.integers(1, i - first + 1))
                        split = int(starts[a_end])
                    else:  # one sentence: split inside it (A keeps all of a 1-token sentence)
                        a_end = i + 1
                        split = lo + int(rng.integers(1, hi - lo)) if hi - lo >= 2 else hi
                    can_true = split < hi
                    # One document: a "random" span starts at any of its sentences but the
                    # true next one (`a_end` when A ends at a sentence boundary).
                    true_next = a_end if split == int(starts[a_end]) and a_end < s1 else None
                    n_other = s1 - s0 - (true_next is not None)
                    can_random = n_docs > 1 or n_other > 0
                    if can_true and (not can_random or rng.random() >= 0.5):
                        rows.append((*_truncate_pair((lo, split), (split, hi), max_tokens, rng),
                                     0))
                    elif can_random:
                        goal_b = goal - (split - lo)
                        if n_docs > 1:
                            rd = int(rng.integers(n_docs - 1))
                            rd += rd >= d  # any document but this one
                            r0, r1 = int(doc_starts[rd]), int(doc_starts[rd + 1])
                            j = int(rng.integers(r0, r1))
                        else:
                            r1 = s1
                            j = s0 + int(rng.integers(n_other))
                            if true_next is not None and j >= true_next:
                                j += 1
                        b_lo = b_hi = int(starts[j])
                        while j < r1:
                            b_hi = int(starts[j + 1])
                            j += 1
                            if b_hi - b_lo >= goal_b:
                                break
                        rows.append((*_truncate_pair((lo, split), (b_lo, b_hi), max_tokens,
                                                     rng), 1))
                        i = a_end - 1  # the sentences after A go back to the document
                    first, length, goal = i + 1, 0, target()
                i += 1
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5)


class PretrainingSource:
    """The ``ExampleSource`` of NSP sentence pairs built by ``pretraining_source``.

    Attributes:
        index: the tokenized corpus.
        instances: (N, 5) int64 ``a_start, a_stop, b_start, b_stop, nsp_label``.
        seq_len: the length every example fits in.
        documents: the corpus document indices it holds (``pretraining_sources``), or None
            for all of them.
    """

    def __init__(self, index: CorpusIndex, instances: np.ndarray, tokenizer: Tokenizer,
                 seq_len: int, seed: int) -> None:
        self.index, self.instances, self.seq_len = index, instances, seq_len
        #: The corpus documents this source was built from (None: all of them).
        self.documents: np.ndarray | None = None
        self._cls, self._sep = tokenizer.cls_id, tokenizer.sep_id
        # (V,) bool: wordpiece continues a word ("##…"), for whole-word masking.
        self._continues = np.fromiter((tokenizer.id_to_token(i).startswith("##")
                                       for i in range(tokenizer.vocab_size)), dtype=bool,
                                      count=tokenizer.vocab_size)
        self._order = _EpochOrder(seed, len(instances), shuffle=True)

    def __len__(self) -> int:
        return self._order.n

    def __getitem__(self, index: int) -> Example:
        a_lo, a_hi, b_lo, b_hi, label = (int(x) for x in self.instances[self._order(index)])
        tokens = self.index.tokens
        a, b = tokens[a_lo:a_hi], tokens[b_lo:b_hi]
        cls_, sep = np.array([self._cls], np.int32), np.array([self._sep], np.int32)
        ids = np.concatenate([cls_, a, sep, b, sep])  # [CLS] A [SEP] B [SEP]
        types = np.zeros(len(ids), dtype=np.int64)
        types[len(a) + 2:] = 1
        # A word starts at every non-"##" piece and at each segment's first piece.
        starts_a, starts_b = ~self._continues[a], ~self._continues[b]
        if len(a):
            starts_a[0] = True
        if len(b):
            starts_b[0] = True
        wa = np.cumsum(starts_a) - 1
        wb = np.cumsum(starts_b) - 1 + (int(wa[-1]) + 1 if len(a) else 0)
        minus = np.array([-1])
        words = np.concatenate([minus, wa, minus, wb, minus])
        return Example(ids.tolist(), types.tolist(), label, None, words.tolist())

    @property
    def stats(self) -> dict[str, int]:
        """Corpus and instance counts: documents, sentences, tokens, instances, is_next, and
        long_sentences, those with more tokens than an example holds (``seq_len - 3``): only
        that many of each are trained on."""
        return {
            "documents": self.index.num_documents,
            "sentences": len(self.index.sentence_starts) - 1,
            "tokens": len(self.index.tokens),
            "instances": len(self.instances),
            "is_next": int((self.instances[:, 4] == 0).sum()),
            "long_sentences": int((np.diff(self.index.sentence_starts) > self.seq_len - 3).sum()),
        }


def pretraining_source(paths: Sequence[Path], tokenizer: Tokenizer, seq_len: int, seed: int,
                       short_seq_prob: float = 0.1, dupe_factor: int = 1) -> PretrainingSource:
    """Build the NSP sentence-pair instances of corpora, deterministically for ``seed``.

    One streaming pass tokenizes the documents (``corpus.read_documents``) into compact
    arrays; instances are then made as ``create_instances`` describes. ``source[i]`` is
    ``[CLS] A [SEP] B [SEP]`` (type ids 0 then 1), at most ``seq_len`` long, with ``label`` the
    NSP label and ``words`` the word index per position.

    Args:
        paths: corpus files (plain text or JSON lines).
        tokenizer: the WordPiece tokenizer.
        seq_len: the longest example, specials included (>= 5).
        seed: seeds instance creation and the per-epoch order (>= 0).
        short_seq_prob: probability that a chunk aims at a random shorter length.
        dupe_factor: how many times each document is turned into instances (each with other
            random choices).

    Raises:
        DataError: a file is missing or malformed, the corpus is empty, or an argument is out
            of range.
    """
    seed = _check_pretraining_args(seed, seq_len, short_seq_prob, dupe_factor)
    paths = [Path(p) for p in paths]
    index = index_corpus(paths, tokenizer)
    return _source_of(index, paths, tokenizer, seq_len, seed, short_seq_prob, dupe_factor)


def pretraining_sources(paths: Sequence[Path], tokenizer: Tokenizer, seq_len: int, seed: int,
                        eval_fraction: float, short_seq_prob: float = 0.1,
                        dupe_factor: int = 1) -> tuple[PretrainingSource, PretrainingSource]:
    """A training and an evaluation source from one corpus, split by documents.

    The documents ``holdout_documents(D, eval_fraction, seed)`` make the evaluation source,
    the others the training source; each is built as ``pretraining_source`` builds one (the
    random B segments of NSP pairs come from the source's own documents), so no text is in
    both. The split depends on the corpus and ``seed`` only.

    Returns:
        ``(train, eval)``; ``source.documents`` are the corpus document indices each holds.

    Raises:
        DataError: as ``pretraining_source``; also ``eval_fraction`` outside ``(0, 1)``, fewer
            than 2 documents, or a side too small to make a sentence pair.
    """
    seed = _check_pretraining_args(seed, seq_len, short_seq_prob, dupe_factor)
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    paths = [Path(p) for p in paths]
    index = index_corpus(paths, tokenizer)
    held = holdout_documents(index.num_documents, eval_fraction, seed)
    kept = np.setdiff1d(np.arange(index.num_documents, dtype=np.int64), held)
    sources = []
    for docs, what in ((kept, "training"), (held, "held-out")):
        source = _source_of(index.select(docs), paths, tokenizer, seq_len, seed,
                            short_seq_prob, dupe_factor, what=f" ({what} documents)")
        source.documents = docs
        sources.append(source)
    return sources[0], sources[1]


def _check_pretraining_args(seed: int, seq_len: int, short_seq_prob: float,
                            dupe_factor: int) -> int:
    seed = _check_seed(seed)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 5:
        raise DataError(f"seq_len must be an int >= 5 for sentence pairs, got {seq_len!r}")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise DataError(f"short_seq_prob must be in [0, 1], got {short_seq_prob!r}")
    if isinstance(dupe_factor, bool) or not isinstance(dupe_factor, int) or dupe_factor < 1:
        raise DataError(f"dupe_factor must be an int >= 1, got {dupe_factor!r}")
    return seed


def _source_of(index: CorpusIndex, paths: Sequence[Path], tokenizer: Tokenizer, seq_len: int,
               seed: int, short_seq_prob: float, dupe_factor: int,
               what: str = "") -> PretrainingSource:
    instances = create_instances(index, seq_len, seed, short_seq_prob, dupe_factor)
    if len(instances) == 0:
        raise DataError(f"{', '.join(map(str, paths))}{what}: the corpus is too small to make "
                        "a sentence pair (one document of one token)")
    return PretrainingSource(index, instances, tokenizer, seq_len, seed)


# -------------------------------------------------------------------------------- masking

def _words_from_pieces(ids: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Word index per position from ``##`` continuation pieces (-1 at special ids)."""
    special = np.isin(ids, list(tokenizer.special_ids))
    starts = np.array([not tokenizer.id_to_token(int(i)).startswith("##") for i in ids])
    starts |= special
    words = np.cumsum(starts) - 1
    words[special] = -1
    return words


def _sample_non_special(rng: np.random.Generator, size: int, vocab_size: int,
                        special: np.ndarray) -> np.ndarray:
    """Uniform ids of ``[0, vocab_size)`` that are not in ``special`` (sorted, unique)."""
    ids = rng.integers(0, vocab_size - len(special), size=size)
    for s in special:  # ascending: shift past each excluded id
        ids += ids >= s
    return ids


def mask_example(ids: np.ndarray, index: int, seed: int, tokenizer: Tokenizer,
                 mask_prob: float = 0.15, whole_word: bool = False,
                 words: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic MLM masking of one example, a pure function of ``(seed, index)``.

    ``round(mask_prob * n)`` (at least 1) of the ``n`` non-special positions are chosen; with
    ``whole_word``, whole words are chosen (in random order, skipping a word that would pass
    the count). Each chosen position becomes ``[MASK]`` (80%), a random non-special id (10%)
    or stays (10%).

    Args:
        ids: (L,) the example's ids.
        index: the global example index.
        seed: the masking seed.
        tokenizer: gives the special, mask and vocabulary ids.
        mask_prob: the fraction of positions to predict.
        whole_word: mask whole words.
        words: (L,) word index per position (-1 at specials); derived from ``##`` when None.

    Returns:
        ``(masked_ids (L,), positions (M,))``: the corrupted ids and the sorted chosen
        positions (their labels are ``ids[positions]``).
    """
    rng = np.random.default_rng([seed, _TAG_MASK, index])
    special = np.array(sorted(tokenizer.special_ids), dtype=np.int64)
    candidates = np.flatnonzero(~np.isin(ids, special))
    out = ids.copy()
    if len(candidates) == 0 or mask_prob <= 0:
        return out, candidates[:0]
    k = max(1, int(len(candidates) * mask_prob + 0.5))
    if whole_word:
        if words is None:
            words = _words_from_pieces(ids, tokenizer)
        cand_words = words[candidates]
        # Group the candidate positions by word (a word split by a special stays two groups).
        boundaries = np.flatnonzero(np.diff(cand_words) != 0) + 1
        groups = np.split(candidates, boundaries)
        chosen_groups: list[np.ndarray] = []
        count = 0
        for g in rng.permutation(len(groups)):
            if count >= k:
                break
            if count + len(groups[g]) > k:
                continue
            chosen_groups.append(groups[g])
            count += len(groups[g])
        if not chosen_groups:  # every word is longer than k: take one anyway
            chosen_groups.append(groups[int(rng.integers(len(groups)))])
        positions = np.sort(np.concatenate(chosen_groups))
    else:
        positions = np.sort(rng.choice(candidates, size=k, replace=False))
    action = rng.random(len(positions))
    replace = _sample_non_special(rng, len(positions), tokenizer.vocab_size, special)
    new = out[positions]
    new[action < 0.8] = tokenizer.mask_id
    randomize = action >= 0.9
    new[randomize] = replace[randomize]
    out[positions] = new
    return out, positions


def _padded_length(examples: Sequence[Example], pad_to: int | None) -> int:
    longest = max(len(e.input_ids) for e in examples)
    if pad_to is None:
        return longest
    if pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest})")
    return pad_to


def collate_pretraining(examples: Sequence[Example], indices: Sequence[int],
                        tokenizer: Tokenizer, seed: int, mask_prob: float = 0.15,
                        whole_word: bool = False,
                        pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch and mask it dynamically.

    Masking of each example depends only on ``(seed, indices[b])`` (``mask_example``), never on
    the batch, its size or the rank.

    Args:
        examples: the batch (B examples).
        indices: their global example indices (the ones given to the source).
        tokenizer: the tokenizer (pad, mask, special ids, vocabulary size).
        seed: the masking seed.
        mask_prob: fraction of non-special positions to predict.
        whole_word: choose whole words (pieces joined by ``##``).
        pad_to: pad to this length instead of the longest example.

    Returns:
        int64 tensors: ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, S);
        ``masked_positions`` (M,) sorted flat indices ``b*S + s``; ``mlm_labels`` (M,) the
        original ids there; ``nsp_labels`` (B,).
    """
    if len(examples) == 0:
        raise ValueError("collate_pretraining: empty batch")
    if len(indices) != len(examples):
        raise ValueError(f"collate_pretraining: {len(examples)} examples but "
                         f"{len(indices)} indices")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob!r}")
    seed = _check_seed(seed)
    seq = _padded_length(examples, pad_to)
    rows: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for b, (ex, index) in enumerate(zip(examples, indices)):
        ids = np.asarray(ex.input_ids, dtype=np.int64)
        words = None if ex.words is None else np.asarray(ex.words, dtype=np.int64)
        masked, pos = mask_example(ids, _check_index(index), seed, tokenizer, mask_prob,
                                   whole_word, words)
        rows.append(masked)
        positions.append(b * seq + pos)  # (M_b,) flat, sorted since pos is
        labels.append(ids[pos])
    lengths = [len(e.input_ids) for e in examples]
    return {
        "input_ids": torch.from_numpy(pad_rows(rows, tokenizer.pad_id, seq)),  # (B, S)
        "attention_mask": torch.from_numpy(length_mask(lengths, seq).astype(np.int64)),
        "token_type_ids": torch.from_numpy(pad_rows([e.token_type_ids for e in examples], 0,
                                                    seq)),
        "masked_positions": torch.from_numpy(np.concatenate(positions).astype(np.int64)),
        "mlm_labels": torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        "nsp_labels": torch.tensor([e.label for e in examples], dtype=torch.int64),
    }


# ---------------------------------------------------------------------------- batch layout

def batch_indices(step: int, micro_step: int, batch_size: int, grad_accum: int, rank: int,
                  world_size: int) -> list[int]:
    """The global example indices of one rank's micro-batch.

    Optimizer step ``step`` consumes ``[step*G, (step+1)*G)`` with
    ``G = batch_size * grad_accum * world_size``; micro-step ``m`` of rank ``r`` takes the
    ``batch_size`` indices from ``step*G + (m*world_size + r)*batch_size``. So micro-step ``m``
    of N ranks at batch b covers what micro-step ``m`` of 1 rank at batch N*b does.

    Raises:
        ValueError: an argument is out of range.
    """
    for name, v, least in (("step", step, 0), ("micro_step", micro_step, 0),
                           ("batch_size", batch_size, 1), ("grad_accum", grad_accum, 1),
                           ("rank", rank, 0), ("world_size", world_size, 1)):
        check_int(name, v, least, ValueError)
    if micro_step >= grad_accum:
        raise ValueError(f"micro_step={micro_step} must be < grad_accum={grad_accum}")
    if rank >= world_size:
        raise ValueError(f"rank={rank} must be < world_size={world_size}")
    global_batch = batch_size * grad_accum * world_size
    start = step * global_batch + (micro_step * world_size + rank) * batch_size
    return list(range(start, start + batch_size))


