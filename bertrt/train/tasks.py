"""Fine-tuning data and metrics: sequence classification, regression and token tagging (BIO).

* ``classification_source``: ``.csv`` / ``.tsv`` (a header row naming ``text``, optional
  ``text_pair``, and ``label``) or ``.jsonl`` (objects with the same keys);
* ``regression_source``: the same files with a number as the ``label`` (a similarity score,
  say); the one label name is ``REGRESSION_LABEL``;
* ``tagging_source``: CoNLL files (token in the first column, tag in the last, a blank line
  between sentences, ``-DOCSTART-`` lines skipped); the tag goes on a word's first wordpiece.

Both return ``(source, labels, n_truncated)``: an ``ExampleSource`` (random access, reshuffled
per epoch from the seed), the label names in id order, and how many inputs were cut to
``seq_len``. Every problem in a file is a ``DataError`` naming the file, the line and the
column.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertrt.padding import length_mask, pad_rows
from bertrt.tokenizer import Tokenizer
from bertrt.train.corpus import JSON_SUFFIXES, DataError, iter_json_objects, iter_lines
from bertrt.train.data import IGNORE_INDEX, Example, PackedSource, starts

__all__ = [
    "REGRESSION_LABEL", "classification_metrics", "classification_source",
    "collate_classification", "collate_regression", "classification_texts", "collate_tagging",
    "conll_texts", "get_entities", "read_classification", "read_conll", "regression_metrics",
    "regression_source", "regression_texts", "tagging_metrics", "tagging_source",
]

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
#: The longest field of a CSV/TSV file, in characters (the `csv` module's own limit, 128 Ki, is
#: below a long document's text; inputs are cut to --seq-len tokens after reading anyway).
CSV_FIELD_LIMIT = 64 * 2**20
DOCSTART = "-DOCSTART-"
#: The one output of a regression head, as its `id2label` names it.
REGRESSION_LABEL = "score"
_INT = re.compile(r"[+-]?\d+")


def _sorted_labels(labels: set[str]) -> list[str]:
    """Sorted label names; numerically when every label is an integer ("2" before "10")."""
    if labels and all(_INT.fullmatch(x) for x in labels):
        return sorted(labels, key=lambda x: (int(x), x))
    return sorted(labels)


def _label_table(seen: dict[str, str], label2id: dict[str, int] | None,
                 path: Path) -> tuple[list[str], dict[str, int]]:
    """Label names in id order and the mapping; ``seen`` maps a label to where it first was
    (``"line 7, column 'label'"``).

    Raises:
        DataError: a label of the file is not in the given ``label2id``.
    """
    if label2id is None:
        names = _sorted_labels(set(seen))
        return names, {name: i for i, name in enumerate(names)}
    for name, where in seen.items():
        if name not in label2id:
            raise DataError(f"{path}: {where}: label {name!r} was not seen in training "
                            f"(known: {', '.join(sorted(label2id))})")
    ids = sorted(set(label2id.values()))
    if ids != list(range(len(ids))) or len(ids) != len(label2id):
        raise DataError(f"label2id must map distinct labels to ids 0..n-1, got {label2id!r}")
    return sorted(label2id, key=label2id.__getitem__), dict(label2id)


# ------------------------------------------------------------------------- classification

@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """The `csv` module's field limit (process-wide) raised to `limit` while a file is read."""
    before = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _rows_table(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV/TSV file with a header, as ``(line number, {column: value})``."""
    lines = (line for _, line in iter_lines(path))
    # TSV (as GLUE's) is not quoted: a '"' inside a text is just a character.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
    with _csv_field_limit(CSV_FIELD_LIMIT):
        yield from _table_rows(path, reader, delimiter)


def _table_rows(path: Path, reader: Any, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        header = next((row for row in reader if any(c.strip() for c in row)), None)
        if header is None:
            raise DataError(f"{path}: the file is empty (expected a header row naming text, "
                            "label and optionally text_pair)")
        header = [h.strip() for h in header]
        for column in ("text", "label"):
            if column not in header:
                raise DataError(f"{path}: line {reader.line_num}: no {column!r} column (columns: "
                                f"{', '.join(repr(h) for h in header)})")
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if len(row) != len(header):
                raise DataError(f"{path}: line {reader.line_num}: expected {len(header)} "
                                f"fields ({delimiter!r}-separated), got {len(row)}")
            yield reader.line_num, dict(zip(header, row))
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise DataError(f"{path}: line {reader.line_num}: a field is larger than the CSV "
                            f"field limit ({CSV_FIELD_LIMIT:,} characters, "
                            f"bertrt.train.tasks.CSV_FIELD_LIMIT)") from None
        raise DataError(f"{path}: line {reader.line_num}: malformed row ({e})") from None


def _rows_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    return iter_json_objects(path, ("text", "label"))


def read_classification(path: Path) -> Iterator[tuple[int, str, str | None, str]]:
    """Stream ``(line, text, text_pair or None, label)`` of a classification file.

    Raises:
        DataError: unknown suffix, empty file, missing ``text``/``label`` column, a row with
            the wrong number of fields, an empty label, or a non-string value.
    """
    for lineno, text, pair, row in _text_rows(path):
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{path}: line {lineno}, column 'label': expected a string or an "
                            f"integer, got {label!r}")
        label = str(label).strip()
        if not label:
            raise DataError(f"{path}: line {lineno}, column 'label': empty label")
        yield lineno, text, pair, label


def _text_rows(path: Path) -> Iterator[tuple[int, str, str | None, dict[str, Any]]]:
    """``(line, text, text_pair or None, row)`` of a CSV/TSV/JSONL file with ``text`` and
    ``label``; the row's ``label`` is left to the caller to read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        rows: Iterator[tuple[int, dict[str, Any]]] = _rows_table(path, TABLE_SUFFIXES[suffix])
    elif suffix in JSON_SUFFIXES:
        rows = _rows_jsonl(path)
    else:
        raise DataError(f"{path}: unknown format {suffix!r} (expected .csv, .tsv or .jsonl)")
    for lineno, row in rows:
        values: list[str | None] = []
        for column in ("text", "text_pair"):
            value = row.get(column)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: line {lineno}, column {column!r}: expected a string, "
                                f"got {type(value).__name__}")
            values.append(value)
        text, pair = values
        yield lineno, text or "", pair, row


def read_scores(path: Path) -> Iterator[tuple[int, str, str | None, float]]:
    """Stream ``(line, text, text_pair or None, score)`` of a regression file: as
    ``read_classification``, with a finite number as the label (a JSON number, or a CSV/TSV
    field such as ``3.8``).

    Raises:
        DataError: as ``read_classification``; also a label that is not a finite number.
    """
    for lineno, text, pair, row in _text_rows(path):
        label = row["label"]
        try:
            if isinstance(label, bool) or not isinstance(label, (str, int, float)):
                raise ValueError
            score = float(label.strip() if isinstance(label, str) else label)
        except (ValueError, OverflowError):
            score = math.nan
        if not math.isfinite(score):
            raise DataError(f"{path}: line {lineno}, column 'label': expected a number (the "
                            f"score to regress), got {label!r}")
        yield lineno, text, pair, score


def classification_texts(path: Path) -> Iterator[str]:
    """The texts (and text pairs) of a classification file, without its labels: what a
    vocabulary is trained on."""
    for _, text, pair, _ in read_classification(path):
        yield text
        if pair:
            yield pair


def classification_source(path: Path, tokenizer: Tokenizer, seq_len: int, seed: int,
                          label2id: dict[str, int] | None = None, *,
                          shuffle: bool = True) -> tuple[PackedSource, list[str], int]:
    """Load a sequence-classification dataset.

    Label names become ids in sorted order (numeric order when all are integers) unless
    ``label2id`` is given (an evaluation set: a label it lacks is an error). Texts (or pairs)
    longer than ``seq_len`` are truncated longest-first and counted.

    Args:
        path: ``.csv``/``.tsv`` with a header (``text``, optional ``text_pair``, ``label``) or
            ``.jsonl`` with those keys.
        tokenizer: the tokenizer.
        seq_len: the longest input, specials included.
        seed: the shuffle seed.
        label2id: the training set's mapping, for an evaluation set.
        shuffle: permute each epoch; False keeps file order (``source[i]`` is row ``i``).

    Returns:
        ``(source, labels, n_truncated)``: examples with ``label`` set, the label names by
        id, and the number of truncated inputs.

    Raises:
        DataError: see ``read_classification``; also no rows, or a label unknown to
            ``label2id`` (file, line and label named).
    """
    path = Path(path)
    texts: list[str] = []
    pairs: list[str] = []
    raw_labels: list[str] = []
    seen: dict[str, str] = {}
    has_pair = False
    for lineno, text, pair, label in read_classification(path):
        has_pair |= pair is not None
        texts.append(text)
        pairs.append(pair or "")
        raw_labels.append(label)
        seen.setdefault(label, f"line {lineno}, column 'label'")
    if not texts:
        raise DataError(f"{path}: no examples (only a header or blank lines)")
    names, mapping = _label_table(seen, label2id, path)
    labels = np.array([mapping[x] for x in raw_labels], dtype=np.int64)
    source, n_truncated = _text_source(texts, pairs if has_pair else None, labels, tokenizer,
                                       seq_len, seed, shuffle)
    return source, names, n_truncated


def _text_source(texts: list[str], pairs: list[str] | None, labels: np.ndarray,
                 tokenizer: Tokenizer, seq_len: int, seed: int,
                 shuffle: bool) -> tuple[PackedSource, int]:
    """The examples of `texts` (and `pairs`) with `labels`, and how many were cut to
    `seq_len` (longest-first)."""
    n_special = 3 if pairs is not None else 2
    if seq_len < n_special:
        raise DataError(f"seq_len={seq_len} leaves no room for the {n_special} special tokens")
    enc = tokenizer(texts, pairs, padding=False, truncation=False)
    ids_list: list[np.ndarray] = enc["input_ids"]
    types_list: list[np.ndarray] = enc["token_type_ids"]
    n_truncated = 0
    for k, ids in enumerate(ids_list):
        if len(ids) > seq_len:  # rare: re-encode just these with the tokenizer's truncation
            n_truncated += 1
            one = tokenizer([texts[k]], None if pairs is None else [pairs[k]],
                            max_length=seq_len, padding=False)
            ids_list[k], types_list[k] = one["input_ids"][0], one["token_type_ids"][0]
    offsets = starts([len(x) for x in ids_list])
    source = PackedSource(np.concatenate(ids_list).astype(np.int32),
                          np.concatenate(types_list).astype(np.int8), offsets, labels, seed,
                          shuffle=shuffle)
    return source, n_truncated


def regression_source(path: Path, tokenizer: Tokenizer, seq_len: int, seed: int,
                      label2id: dict[str, int] | None = None, *,
                      shuffle: bool = True) -> tuple[PackedSource, list[str], int]:
    """Load a regression dataset (a score per text or text pair, e.g. STS-B's similarity).

    As ``classification_source``, with a number as each label (``read_scores``); examples
    carry it as a float ``label``. ``label2id`` is ignored (there is one output).

    Returns:
        ``(source, [REGRESSION_LABEL], n_truncated)``.

    Raises:
        DataError: see ``read_scores``; also no rows.
    """
    path = Path(path)
    texts: list[str] = []
    pairs: list[str] = []
    scores: list[float] = []
    has_pair = False
    for _, text, pair, score in read_scores(path):
        has_pair |= pair is not None
        texts.append(text)
        pairs.append(pair or "")
        scores.append(score)
    if not texts:
        raise DataError(f"{path}: no examples (only a header or blank lines)")
    source, n_truncated = _text_source(texts, pairs if has_pair else None,
                                       np.array(scores, dtype=np.float32), tokenizer, seq_len,
                                       seed, shuffle)
    return source, [REGRESSION_LABEL], n_truncated


def regression_texts(path: Path) -> Iterator[str]:
    """The texts (and text pairs) of a regression file, without its scores."""
    for _, text, pair, _ in read_scores(path):
        yield text
        if pair:
            yield pair


# -------------------------------------------------------------------------------- tagging

def read_conll(path: Path) -> Iterator[tuple[int, list[str], list[str]]]:
    """Stream the sentences of a CoNLL file as ``(first line, tokens, tags)``.

    The token is the first whitespace-separated column and the tag the last; blank lines end
    sentences; ``-DOCSTART-`` lines are skipped.

    Raises:
        DataError: a line with fewer than two columns (file and line named), invalid UTF-8.
    """
    path = Path(path)
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for lineno, line in iter_lines(path):
        cols = line.split()
        if not cols or cols[0] == DOCSTART:
            if tokens:
                yield start, tokens, tags
                tokens, tags = [], []
            continue
        if len(cols) < 2:
            raise DataError(f"{path}: line {lineno}: expected a token and a tag separated by "
                            f"white space, got {line.strip()!r}")
        if not tokens:
            start = lineno
        tokens.append(cols[0])
        tags.append(cols[-1])
    if tokens:
        yield start, tokens, tags


def conll_texts(path: Path) -> Iterator[str]:
    """The sentences of a CoNLL file as text (its tokens only, no tag or other column)."""
    for _, tokens, _ in read_conll(path):
        yield " ".join(tokens)


def tagging_source(path: Path, tokenizer: Tokenizer, seq_len: int, seed: int,
                   label2id: dict[str, int] | None = None, *,
                   shuffle: bool = True) -> tuple[PackedSource, list[str], int]:
    """Load a CoNLL token-tagging dataset.

    Each word is split into wordpieces; its tag id goes on the first piece and -100 on the
    others and on ``[CLS]``/``[SEP]`` (a word that gives no piece becomes ``[UNK]``, so every
    word keeps a position). A sentence longer than ``seq_len`` is cut (its last words lose their
    position) and counted. Tag names become ids in sorted order unless ``label2id`` is given.

    Args:
        path: the CoNLL file.
        tokenizer: the tokenizer.
        seq_len: the longest input, specials included (>= 3).
        seed: the shuffle seed.
        label2id: the training set's mapping, for an evaluation set.
        shuffle: permute each epoch; False keeps file order.

    Returns:
        ``(source, labels, n_truncated)``; examples carry ``tags`` and ``words`` (the word index
        of each position, -1 at specials).

    Raises:
        DataError: a malformed line, no sentences, or a tag unknown to ``label2id``.
    """
    path = Path(path)
    if seq_len < 3:
        raise DataError(f"seq_len={seq_len} must be >= 3 for tagging")
    sentences: list[list[str]] = []
    sentence_tags: list[list[str]] = []
    seen: dict[str, str] = {}
    for lineno, tokens, tags in read_conll(path):
        sentences.append(tokens)
        sentence_tags.append(tags)
        for k, tag in enumerate(tags):  # a sentence's lines are consecutive
            seen.setdefault(tag, f"line {lineno + k}, last column (the tag)")
    if not sentences:
        raise DataError(f"{path}: no sentences (expected token/tag lines)")
    names, mapping = _label_table(seen, label2id, path)
    encs = tokenizer.backend.encode_batch(sentences, is_pretokenized=True,
                                          add_special_tokens=False)
    ids_out: list[np.ndarray] = []
    tags_out: list[np.ndarray] = []
    words_out: list[np.ndarray] = []
    n_truncated = 0
    for words, tags, enc in zip(sentences, sentence_tags, encs):
        pieces: list[list[int]] = [[] for _ in words]
        for piece, w in zip(enc.ids, enc.word_ids):
            if w is not None:
                pieces[w].append(piece)
        ids = [tokenizer.cls_id]
        pos_tags = [IGNORE_INDEX]
        pos_words = [-1]
        for w, (word_pieces, tag) in enumerate(zip(pieces, tags)):
            word_pieces = word_pieces or [tokenizer.unk_id]
            ids.extend(word_pieces)
            pos_tags.extend([mapping[tag]] + [IGNORE_INDEX] * (len(word_pieces) - 1))
            pos_words.extend([w] * len(word_pieces))
        if len(ids) + 1 > seq_len:
            n_truncated += 1
            ids, pos_tags, pos_words = ids[:seq_len - 1], pos_tags[:seq_len - 1], \
                pos_words[:seq_len - 1]
        ids_out.append(np.array([*ids, tokenizer.sep_id], dtype=np.int32))
        tags_out.append(np.array([*pos_tags, IGNORE_INDEX], dtype=np.int32))
        words_out.append(np.array([*pos_words, -1], dtype=np.int32))
    offsets = starts([len(x) for x in ids_out])
    flat_ids = np.concatenate(ids_out)
    source = PackedSource(flat_ids, np.zeros(len(flat_ids), dtype=np.int8), offsets,
                          np.full(len(ids_out), IGNORE_INDEX, dtype=np.int64), seed,
                          tags=np.concatenate(tags_out), words=np.concatenate(words_out),
                          shuffle=shuffle)
    return source, names, n_truncated


# -------------------------------------------------------------------------------- collate

def _pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    if len(examples) == 0:
        raise ValueError("collate: empty batch")
    lengths = [len(e.input_ids) for e in examples]
    return {  # (B, S) each
        "input_ids": torch.from_numpy(pad_rows([e.input_ids for e in examples], pad_id)),
        "attention_mask": torch.from_numpy(length_mask(lengths).astype(np.int64)),
        "token_type_ids": torch.from_numpy(pad_rows([e.token_type_ids for e in examples], 0)),
    }


def collate_classification(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example.

    Returns:
        int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, S) and ``labels`` (B,).
    """
    out = _pad_batch(examples, pad_id)
    out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.int64)
    return out


def collate_regression(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example.

    Returns:
        int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, S) and float32
        ``labels`` (B,): the scores.
    """
    out = _pad_batch(examples, pad_id)
    out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.float32)
    return out


def collate_tagging(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example.

    Returns:
        int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels`` (B, S):
        tag ids, -100 at specials, non-first pieces and padding.
    """
    out = _pad_batch(examples, pad_id)
    for b, e in enumerate(examples):
        if e.tags is None:
            raise ValueError(f"collate_tagging: example {b} has no tags")
    seq = out["input_ids"].shape[1]
    out["labels"] = torch.from_numpy(pad_rows([e.tags for e in examples],  # type: ignore[misc]
                                              IGNORE_INDEX, seq))
    return out


# -------------------------------------------------------------------------------- metrics

def classification_metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    """Accuracy and macro-F1.

    Macro-F1 averages the per-class F1 over the classes present in ``labels`` or ``preds`` (as
    scikit-learn's ``f1_score(average="macro")``); a class with no true positive scores 0.

    Args:
        preds: (N,) predicted class ids.
        labels: (N,) gold class ids.
        num_labels: the number of classes (ids are ``0..num_labels-1``).

    Returns:
        ``{"accuracy", "macro_f1", "n"}``; 0.0 for both on an empty input. With two classes
        (a matching or paraphrase task) also ``precision``, ``recall`` and ``f1`` of the
        positive class, id 1 (the second label in sorted order: ``1`` of ``0``/``1``).
    """
    preds = np.asarray(preds).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in length")
    n = len(labels)
    positive = {"precision": 0.0, "recall": 0.0, "f1": 0.0} if num_labels == 2 else {}
    if n == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, **positive, "n": 0}
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)  # (gold, pred)
    np.add.at(confusion, (labels, preds), 1)
    tp = np.diag(confusion)
    gold, pred = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (gold + pred) > 0
    f1 = np.divide(2 * tp, gold + pred, out=np.zeros(num_labels), where=present)
    if positive:  # a ratio with a zero denominator is 0.0
        positive = {"precision": float(tp[1] / pred[1]) if pred[1] else 0.0,
                    "recall": float(tp[1] / gold[1]) if gold[1] else 0.0, "f1": float(f1[1])}
    return {"accuracy": float(tp.sum() / n), "macro_f1": float(f1[present].mean()),
            **positive, "n": n}


def regression_metrics(preds: np.ndarray, golds: np.ndarray) -> dict:
    """Pearson and Spearman correlation, and the mean squared error, of predicted scores.

    Spearman's is Pearson's of the ranks, tied values taking their mean rank (as
    ``scipy.stats.spearmanr``). A correlation with a constant side is 0.0.

    Args:
        preds: (N,) predicted scores.
        golds: (N,) gold scores.

    Returns:
        ``{"pearson", "spearman", "mse", "n"}``; 0.0 for each on an empty input.
    """
    preds = np.asarray(preds, dtype=np.float64).reshape(-1)
    golds = np.asarray(golds, dtype=np.float64).reshape(-1)
    if preds.shape != golds.shape:
        raise ValueError(f"preds {preds.shape} and golds {golds.shape} differ in length")
    if len(golds) == 0:
        return {"pearson": 0.0, "spearman": 0.0, "mse": 0.0, "n": 0}
    return {"pearson": _pearson(preds, golds),
            "spearman": _pearson(_mean_ranks(preds), _mean_ranks(golds)),
            "mse": float(np.mean((preds - golds) ** 2)), "n": len(golds)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    norm = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / norm if norm > 0 else 0.0


def _mean_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N of `x`, each run of equal values at its mean rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    firsts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # each run's start
    lasts = np.r_[firsts[1:], len(x)]  # and its end (exclusive)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((firsts + lasts + 1) / 2, lasts - firsts)
    return ranks


def _split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "_")`` (seqeval's reading)."""
    prefix = tag[:1]
    kind = tag[1:].split("-", maxsplit=1)[-1] or "_"
    return prefix, kind


def _chunk_ends(prev: str, tag: str, prev_kind: str, kind: str) -> bool:
    return (prev in ("E", "S") or (prev in ("B", "I") and tag in ("B", "S", "O"))
            or (prev not in ("O", ".") and prev_kind != kind))


def _chunk_starts(prev: str, tag: str, prev_kind: str, kind: str) -> bool:
    return (tag in ("B", "S") or (prev in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_kind != kind))


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity spans of one tag sequence, as seqeval's default (lenient IOB/IOBES) mode reads
    them: an ``I-`` after ``O`` or after another type starts an entity.

    Returns:
        ``(type, first, last)`` spans, positions inclusive.
    """
    out: list[tuple[str, int, int]] = []
    prev, prev_kind, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = _split_tag(tag)
        if _chunk_ends(prev, prefix, prev_kind, kind):
            out.append((prev_kind, begin, i - 1))
        if _chunk_starts(prev, prefix, prev_kind, kind):
            begin = i
        prev, prev_kind = prefix, kind
    return out


def tagging_metrics(pred_tags: list[list[str]], gold_tags: list[list[str]]) -> dict:
    """Token accuracy and entity-level precision, recall and F1 (exact span and type).

    Args:
        pred_tags: predicted tag names, one list per sentence.
        gold_tags: gold tag names, the same shape.

    Returns:
        ``{"accuracy", "token_accuracy" (the same number), "precision", "recall", "f1",
        "n_pred", "n_gold", "n_correct"}``; a ratio with a zero denominator is 0.0.

    Raises:
        ValueError: the two differ in the number of sentences or of tags in a sentence.
    """
    if len(pred_tags) != len(gold_tags):
        raise ValueError(f"{len(pred_tags)} predicted sentences but {len(gold_tags)} gold")
    correct_tokens = total = n_pred = n_gold = n_correct = 0
    for k, (pred, gold) in enumerate(zip(pred_tags, gold_tags)):
        if len(pred) != len(gold):
            raise ValueError(f"sentence {k}: {len(pred)} predicted tags but {len(gold)} gold")
        correct_tokens += sum(p == g for p, g in zip(pred, gold))
        total += len(gold)
        pred_entities, gold_entities = set(get_entities(pred)), set(get_entities(gold))
        n_pred += len(pred_entities)
        n_gold += len(gold_entities)
        n_correct += len(pred_entities & gold_entities)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = correct_tokens / total if total else 0.0
    return {"accuracy": accuracy, "token_accuracy": accuracy, "precision": precision,
            "recall": recall, "f1": f1, "n_pred": n_pred, "n_gold": n_gold,
            "n_correct": n_correct}
