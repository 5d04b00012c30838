"""SQuAD data and metrics: the v1.1 and v2.0 JSON files, training windows, exact match and F1.

A file is `{"data": [{"paragraphs": [{"context": ..., "qas": [{"id", "question",
"answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`; `is_impossible` (v2.0) marks a
question its context does not answer. Every answer is checked against its context
(`context[answer_start:answer_start + len(text)] == text`) when the file is read, so a bad
file fails in one line naming the question before anything is trained or written.

Training windows (`training_windows`) are the inference windows of `bertrt.serve.qa`: the
answer's characters are mapped to tokens through the tokenizer's offsets, and a window that
does not hold the whole answer (or any window of an impossible question) points at `[CLS]`
(position 0) for both start and end.

Metrics follow the official SQuAD evaluation scripts: answers are normalised (lower case,
punctuation and the articles a/an/the removed, white space collapsed); exact match and token
F1 take the best over a question's gold answers; a question without an answer (v2.0) has the
gold answer "" and scores 1 only for the empty prediction. Both are percentages.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertrt.serve import qa
from bertrt.tokenizer import Tokenizer
from bertrt.train.corpus import DataError

__all__ = ["QAExample", "QAWindows", "exact_match", "f1_score", "normalize_answer",
           "read_squad", "squad_metrics", "training_windows"]


@dataclass(frozen=True)
class QAExample:
    """One question of a SQuAD file.

    Attributes:
        id: its `id` (or its place in the file, when it has none).
        question: the question.
        context: its paragraph's context.
        answers: `(text, answer_start)` of each gold answer (none for an impossible one).
        impossible: v2.0's `is_impossible`.
    """

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    impossible: bool


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path,
           expected: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{path}: {where}: no {key!r} (expected {expected})")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(f"{path}: {where}: {key!r} is {type(value).__name__}, expected "
                        f"{expected}")
    return value


def read_squad(path: str | Path, *, training: bool = False) -> tuple[list[QAExample], bool]:
    """Read and check a SQuAD v1.1 or v2.0 file.

    Args:
        path: the JSON file.
        training: every answerable question must have an answer (its first one is trained).

    Returns:
        `(examples, v2)`: the questions in file order, and whether the file is v2.0 (its
        `version` says so, or a question has `is_impossible`), whose questions may have no
        answer.

    Raises:
        DataError: one line naming the file and the question: not JSON, a missing or mistyped
            field (`answer_start` included), an answer that does not match its context at
            `answer_start`, no question at all.
    """
    path = Path(path)
    try:
        root = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON (line {exc.lineno}: {exc.msg}); expected a SQuAD "
                        "file") from None
    data = _field(root, "data", list, "top level", path, "a SQuAD file: {\"data\": [...]}")
    v2 = str(root.get("version", "")).lstrip("v").startswith("2")
    examples: list[QAExample] = []
    for i, article in enumerate(data):
        paragraphs = _field(article, "paragraphs", list, f"data[{i}]", path,
                            "a list of paragraphs")
        for j, paragraph in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            context = _field(paragraph, "context", str, where, path, "the context text")
            for k, item in enumerate(_field(paragraph, "qas", list, where, path,
                                            "a list of questions")):
                example = _question(item, context, f"{where}.qas[{k}]", path, training)
                v2 |= isinstance(item, dict) and "is_impossible" in item
                examples.append(example)
    if not examples:
        raise DataError(f"{path}: no questions (expected data[].paragraphs[].qas[])")
    return examples, v2


def _question(item: Any, context: str, where: str, path: Path, training: bool) -> QAExample:
    question = _field(item, "question", str, where, path, "the question text")
    qid = item.get("id", where)
    where = f"{where} (id {qid!r})" if "id" in item else where
    if not question.strip():
        raise DataError(f"{path}: {where}: the question is empty")
    impossible = item.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise DataError(f"{path}: {where}: 'is_impossible' is {impossible!r}, expected true "
                        "or false")
    raw = [] if impossible and "answers" not in item else _field(
        item, "answers", list, where, path, "a list of {\"text\", \"answer_start\"}")
    answers = []
    for a, answer in enumerate(raw):
        at = f"{where}: answers[{a}]"
        text = _field(answer, "text", str, at, path, "the answer text")
        start = _field(answer, "answer_start", int, at, path,
                       "the answer's character offset in its context")
        found = context[start:start + len(text)]
        if start < 0 or found != text:
            raise DataError(f"{path}: {at}: the answer {_show(text)} does not match its "
                            f"context at answer_start {start} (the context has "
                            f"{_show(found)} there)")
        answers.append((text, start))
    if impossible:
        answers = []
    elif training and not answers:
        raise DataError(f"{path}: {where}: no answers, and 'is_impossible' is not true "
                        "(expected at least one answer to train on)")
    return QAExample(str(qid), question, context, tuple(answers), bool(impossible))


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


# ---------------------------------------------------------------------- training windows
@dataclass
class QAWindows:
    """The windows of a set of questions, and where each answer is in each window.

    Attributes:
        examples: the questions.
        contexts: their contexts' tokens (`bertrt.serve.qa.Context`), one per question.
        windows: every window, question by question.
        starts: (W,) the answer's first token in each window (0, `[CLS]`: not in it).
        ends: (W,) its last token (0 likewise).
    """

    examples: list[QAExample]
    contexts: list[qa.Context]
    windows: list[qa.Window]
    starts: np.ndarray
    ends: np.ndarray


def training_windows(examples: Sequence[QAExample], tokenizer: Tokenizer, seq_len: int,
                     doc_stride: int, max_query_length: int) -> QAWindows:
    """Windows of `examples` labelled with their first answer's tokens (see the module doc)."""
    contexts = qa.encode_contexts(tokenizer, [e.context for e in examples])
    questions = qa.encode_questions(tokenizer, [e.question for e in examples],
                                    max_query_length)
    windows = qa.make_windows(tokenizer, questions, contexts, seq_len, doc_stride)
    starts = np.zeros(len(windows), dtype=np.int64)
    ends = np.zeros(len(windows), dtype=np.int64)
    for w, window in enumerate(windows):
        example = examples[window.pair]
        if not example.answers:
            continue
        text, first_char = example.answers[0]
        span = _token_span(contexts[window.pair].offsets, first_char, first_char + len(text))
        if span is None:
            continue
        first, last = span
        if window.first <= first and last < window.last:
            starts[w] = window.context_start + first - window.first
            ends[w] = window.context_start + last - window.first
    return QAWindows(list(examples), contexts, windows, starts, ends)


def _token_span(offsets: np.ndarray, start: int, end: int) -> tuple[int, int] | None:
    """The first and last tokens that the characters `[start, end)` touch, or None (an
    answer of white space only)."""
    touching = np.nonzero((offsets[:, 1] > start) & (offsets[:, 0] < end))[0]
    if len(touching) == 0:
        return None
    return int(touching[0]), int(touching[-1])


# ---------------------------------------------------------------------- metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(gold: str, prediction: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(prediction))


def f1_score(gold: str, prediction: str) -> float:
    """Token F1 of two normalised answers (1 when both are empty, 0 when one is)."""
    gold_tokens = normalize_answer(gold).split()
    pred_tokens = normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(examples: Iterable[QAExample], predictions: dict[str, str]) -> dict:
    """Exact match and F1 (percentages) of `predictions` (answer text by question id).

    Returns:
        `exact_match`, `f1`, `total`; with questions of both kinds also `has_answer_f1`,
        `no_answer_f1` and their counts, as the v2.0 script reports them.

    Raises:
        ValueError: a question has no prediction.
    """
    scores: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for example in examples:
        if example.id not in predictions:
            raise ValueError(f"no prediction for question {example.id!r}")
        golds = [t for t, _ in example.answers if normalize_answer(t)] or [""]
        pred = predictions[example.id]
        scores[bool(example.answers)].append((max(exact_match(g, pred) for g in golds),
                                              max(f1_score(g, pred) for g in golds)))
    every = scores[True] + scores[False]
    out: dict[str, float] = {"exact_match": _percent(every, 0), "f1": _percent(every, 1),
                             "total": len(every)}
    if scores[True] and scores[False]:
        out.update(has_answer_f1=_percent(scores[True], 1), has_answer_total=len(scores[True]),
                   no_answer_f1=_percent(scores[False], 1), no_answer_total=len(scores[False]))
    return out


def _percent(pairs: list[tuple[float, float]], k: int) -> float:
    return 100.0 * sum(p[k] for p in pairs) / len(pairs) if pairs else 0.0


def predict_answers(windows: QAWindows, start_logits: Sequence[np.ndarray],
                    end_logits: Sequence[np.ndarray], max_answer_length: int,
                    null_threshold: float | None) -> dict[str, str]:
    """The best answer text of each question (by id) from its windows' logits (`None` for
    `null_threshold`: always a span, as for SQuAD v1.1)."""
    by_pair: list[list[int]] = [[] for _ in windows.examples]
    for i, window in enumerate(windows.windows):
        by_pair[window.pair].append(i)
    out = {}
    for k, (example, indices) in enumerate(zip(windows.examples, by_pair)):
        best = qa.best_answers([windows.windows[i] for i in indices],
                               [start_logits[i] for i in indices],
                               [end_logits[i] for i in indices], windows.contexts[k],
                               example.context, 1, max_answer_length, null_threshold)
        out[example.id] = best[0]["answer"] if best else ""
    return out


@dataclass(frozen=True)
class QAItem:
    """One training or evaluation window: its number, inputs and answer positions."""

    number: int
    input_ids: np.ndarray
    token_type_ids: np.ndarray
    start: int
    end: int


class WindowSource:
    """An `ExampleSource` of windows (reshuffled each epoch from the seed, as the other
    tasks' sources), each a `QAItem`."""

    def __init__(self, windows: QAWindows, seed: int, shuffle: bool = True) -> None:
        from bertrt.train.data import _EpochOrder

        if not windows.windows:
            raise DataError("a source needs at least one window")
        self.windows = windows
        self._order = _EpochOrder(seed, len(windows.windows), shuffle)

    def __len__(self) -> int:
        return len(self.windows.windows)

    def __getitem__(self, index: int) -> QAItem:
        k = self._order(index)
        window = self.windows.windows[k]
        return QAItem(k, window.input_ids, window.token_type_ids,
                      int(self.windows.starts[k]), int(self.windows.ends[k]))


def squad_texts(path: Path) -> Iterable[str]:
    """The contexts and questions of a SQuAD file (what a vocabulary is trained on)."""
    examples, _ = read_squad(path)
    seen: set[str] = set()
    for example in examples:
        if example.context not in seen:
            seen.add(example.context)
            yield example.context
        yield example.question
