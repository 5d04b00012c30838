"""Extractive question answering: question + context windows in, answer spans out.

    (question, context) ──tokenize──▶ windows [CLS] question [SEP] context part [SEP]
    ──model──▶ start/end logits per token ──per window: softmax, n-best spans──▶ answers
    over all windows of the pair, each mapped back to characters of the context

Windows (`make_windows`): the question is cut to `max_query_length` tokens; a context longer
than a window holds is split into windows that overlap by `doc_stride` context tokens, as the
`tokenizers` library and transformers' question-answering pipeline split it (the window after
one starting at context token k starts at k + room - doc_stride, room being the context tokens
a window holds; the last window ends at the context's end).

Scores (`best_answers`), as that pipeline computes them: in each window the start and end
logits are each turned into probabilities by a softmax over the window's context tokens and
`[CLS]`; a span's score is p_start · p_end (spans of at most `max_answer_length` tokens, end
not before start); the `top_k * 2 + 10` best spans of each window are mapped to characters,
widened to whole words (as far as the window holds them); spans of every window that give the
same text (ignoring case) add their scores. The null answer (no answer: "" at 0) scores the
smallest p_start · p_end of `[CLS]` over the windows, and is given only when asked for
(`null_threshold`): it ranks with that score less the threshold.

Nothing here imports torch: the engine runs the windows on any backend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bertrt.errors import BertrtError
from bertrt.serve.workload import Request

if TYPE_CHECKING:
    from bertrt.serve.engine import InferenceEngine
    from bertrt.tokenizer import Tokenizer

#: transformers' question-answering pipeline defaults, which `answer` shares.
MAX_SEQ_LEN = 384
DOC_STRIDE = 128
MAX_QUERY_LENGTH = 64
MAX_ANSWER_LENGTH = 15
#: The logit non-context tokens get before the softmax (the pipeline's), so their probability
#: is exactly 0.
_MASKED = -10000.0


@dataclass(frozen=True)
class Window:
    """One model input of a (question, context) pair.

    Attributes:
        pair: the index of its pair.
        input_ids: (L,) `[CLS] question [SEP] context[first:last] [SEP]`.
        token_type_ids: (L,) 0 for `[CLS] question [SEP]`, 1 after.
        context_start: the position of the first context token in the window.
        first: the window's first context token, as an index into the pair's context tokens.
        last: one past its last.
    """

    pair: int
    input_ids: np.ndarray
    token_type_ids: np.ndarray
    context_start: int
    first: int
    last: int

    @property
    def request(self) -> Request:
        return Request(self.input_ids, self.token_type_ids)


@dataclass(frozen=True)
class Context:
    """A context's tokens: ids, character spans, and the word each belongs to.

    Attributes:
        ids: (N,) wordpiece ids.
        offsets: (N, 2) character span of each token in the context.
        word_ids: (N,) the index of each token's word (a word's pieces are consecutive).
    """

    ids: np.ndarray
    offsets: np.ndarray
    word_ids: np.ndarray

    def span(self, start: int, end: int, first: int, last: int) -> tuple[int, int]:
        """The characters of tokens `start..end` widened to whole words, as far as the window
        of tokens `[first, last)` holds them (a word cut by the window's edge is cut there, as
        the `tokenizers` library's window encodings see it)."""
        words = self.word_ids
        while start > first and words[start - 1] == words[start]:
            start -= 1
        while end + 1 < last and words[end + 1] == words[end]:
            end += 1
        return int(self.offsets[start, 0]), int(self.offsets[end, 1])


def encode_contexts(tokenizer: Tokenizer, contexts: Sequence[str]) -> list[Context]:
    """Each context's wordpieces, their character spans and their words."""
    out = []
    for enc in tokenizer.backend.encode_batch(list(contexts), add_special_tokens=False):
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        words = np.asarray([-1 if w is None else w for w in enc.word_ids], dtype=np.int64)
        out.append(Context(np.asarray(enc.ids, dtype=np.int64), offsets, words))
    return out


def encode_questions(tokenizer: Tokenizer, questions: Sequence[str],
                     max_query_length: int) -> list[np.ndarray]:
    """Each question's wordpiece ids, cut to `max_query_length`."""
    encs = tokenizer.backend.encode_batch(list(questions), add_special_tokens=False)
    return [np.asarray(e.ids[:max_query_length], dtype=np.int64) for e in encs]


def window_spans(n: int, room: int, doc_stride: int) -> list[tuple[int, int]]:
    """The `[first, last)` context-token ranges of the windows over `n` context tokens, `room`
    per window, consecutive windows overlapping by `doc_stride` (one empty window for n=0)."""
    if n <= room:
        return [(0, n)]
    step = room - doc_stride
    spans = []
    for first in range(0, n, step):
        last = min(first + room, n)
        spans.append((first, last))
        if last == n:
            break
    return spans


def make_windows(tokenizer: Tokenizer, question_ids: Sequence[np.ndarray],
                 contexts: Sequence[Context], seq_len: int, doc_stride: int) -> list[Window]:
    """The windows of every (question, context) pair, pair by pair.

    Raises:
        BertrtError: a question leaves a window no more room for context than `doc_stride`.
    """
    windows = []
    for k, (q, ctx) in enumerate(zip(question_ids, contexts)):
        room = seq_len - len(q) - 3
        if room <= doc_stride:
            raise BertrtError(
                f"question {k}: with its {len(q)} tokens a window of {seq_len} holds {room} "
                f"context tokens, which must be more than doc_stride={doc_stride} (raise the "
                f"sequence length, or lower doc_stride or max_query_length)")
        head = np.concatenate([[tokenizer.cls_id], q, [tokenizer.sep_id]]).astype(np.int64)
        for first, last in window_spans(len(ctx.ids), room, doc_stride):
            ids = np.concatenate([head, ctx.ids[first:last], [tokenizer.sep_id]])
            types = np.zeros(len(ids), dtype=np.int64)
            types[len(head):] = 1
            windows.append(Window(k, ids, types, len(head), first, last))
    return windows


# ---------------------------------------------------------------------- scoring
def _probabilities(logits: np.ndarray, window: Window) -> np.ndarray:
    """Softmax over `[CLS]` and the window's context tokens (others get probability 0)."""
    n = window.last - window.first
    allowed = np.zeros(len(logits), dtype=bool)
    allowed[0] = True
    allowed[window.context_start: window.context_start + n] = True
    x = np.where(allowed, logits.astype(np.float64), _MASKED)
    e = np.exp(x - x.max())
    return e / e.sum()


def best_spans(p_start: np.ndarray, p_end: np.ndarray, count: int,
               max_answer_length: int) -> list[tuple[int, int, float]]:
    """The `count` best `(start, end, p_start * p_end)` spans, end - start < max_answer_length,
    best first."""
    scores = np.tril(np.triu(np.outer(p_start, p_end)), max_answer_length - 1)
    flat = scores.ravel()
    if count == 1:
        order = np.array([int(np.argmax(flat))])
    else:
        order = np.argsort(-flat, kind="stable")[:count]
    starts, ends = np.unravel_index(order, scores.shape)
    return [(int(s), int(e), float(flat[i])) for s, e, i in zip(starts, ends, order)
            if 0 <= e - s < max_answer_length]  # the rest score 0: not spans at all


def best_answers(windows: Sequence[Window], start_logits: Sequence[np.ndarray],
                 end_logits: Sequence[np.ndarray], context: Context, text: str, top_k: int = 1,
                 max_answer_length: int = MAX_ANSWER_LENGTH,
                 null_threshold: float | None = None) -> list[dict[str, Any]]:
    """The `top_k` answers of one pair from the logits of its windows (see the module doc).

    Returns:
        `{"answer", "score", "start", "end"}` dicts, best first: `text[start:end] == answer`.
    """
    answers: list[dict[str, Any]] = []
    by_text: dict[str, dict[str, Any]] = {}
    null = 1e6
    for window, s_logits, e_logits in zip(windows, start_logits, end_logits):
        p_start, p_end = _probabilities(s_logits, window), _probabilities(e_logits, window)
        null = min(null, float(p_start[0] * p_end[0]))
        c0, n = window.context_start, window.last - window.first
        if n == 0:
            continue
        spans = best_spans(p_start[c0:c0 + n], p_end[c0:c0 + n], top_k * 2 + 10,
                           max_answer_length)
        for s, e, score in spans:
            start, end = context.span(window.first + s, window.first + e, window.first,
                                      window.last)
            key = text[start:end].lower()
            if key in by_text:
                by_text[key]["score"] += score
                continue
            found = {"answer": text[start:end], "score": score, "start": start, "end": end}
            answers.append(found)
            by_text[key] = found
    ranked = [(a["score"], a) for a in answers]
    if null_threshold is not None:
        ranked.append((null - null_threshold, {"answer": "", "score": null, "start": 0,
                                               "end": 0}))
    ranked.sort(key=lambda pair: pair[0], reverse=True)
    return [a for _, a in ranked[:top_k]]


# ---------------------------------------------------------------------- the engine's call
@dataclass
class WindowLogits:
    """The start and end logits of each window, (L,) each, in window order; and what the run
    cost."""

    start: list[np.ndarray]
    end: list[np.ndarray]
    batches: int = 0
    tokens: int = 0
    positions: int = 0


def run_windows(engine: InferenceEngine, windows: Sequence[Window]) -> WindowLogits:
    """Run `windows` on the engine's backend, longest first in token-budget batches."""
    from bertrt.serve.engine import length_sorted_batches

    out = WindowLogits([np.empty(0)] * len(windows), [np.empty(0)] * len(windows))
    lengths = np.array([len(w.input_ids) for w in windows], dtype=np.int64)
    for picked in length_sorted_batches(lengths, engine.max_batch_tokens, engine.packed):
        outputs = engine.backend.run_sequences([windows[i].request for i in picked],
                                               engine.tokenizer.pad_id)
        for b, i in enumerate(picked):
            out.start[i] = outputs.tokens("start_logits", b)
            out.end[i] = outputs.tokens("end_logits", b)
        sizes = lengths[picked]
        out.batches += 1
        out.tokens += int(sizes.sum())
        out.positions += int(sizes.sum()) if engine.packed else int(sizes.max()) * len(sizes)
    return out


def check_settings(seq_len: int, doc_stride: int, max_query_length: int,
                   max_answer_length: int, top_k: int = 1, what: str = "",
                   longest_question: bool = True) -> None:
    """Raise `BertrtError` for bad settings: each an integer >= 1 (the stride >= 0), and, with
    `longest_question`, a window of `seq_len` holding more context tokens than `doc_stride`
    beside a question of `max_query_length` tokens (without: `make_windows` checks each
    question as it is). `what` prefixes the names (`--` for flags)."""
    for name, value, least in (("seq_len", seq_len, 8), ("doc_stride", doc_stride, 0),
                               ("max_query_length", max_query_length, 1),
                               ("max_answer_length", max_answer_length, 1),
                               ("top_k", top_k, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise BertrtError(f"{_name(what, name)}: expected an integer of at least {least}, "
                              f"got {value!r}")
    room = seq_len - max_query_length - 3
    if longest_question and doc_stride >= room:
        raise BertrtError(
            f"{_name(what, 'doc_stride')} {doc_stride} must be less than the context tokens a "
            f"window holds: {_name(what, 'seq_len')} {seq_len} - "
            f"{_name(what, 'max_query_length')} {max_query_length} - 3 special tokens = {room}")


def _name(prefix: str, name: str) -> str:
    return prefix + name.replace("_", "-") if prefix else name


def answer(engine: InferenceEngine, questions: list[str], contexts: list[str], top_k: int = 1,
           *, max_answer_length: int = MAX_ANSWER_LENGTH, doc_stride: int = DOC_STRIDE,
           max_seq_len: int | None = None, max_query_length: int = MAX_QUERY_LENGTH,
           null_threshold: float | None = None) -> list[Any]:
    """`InferenceEngine.answer`'s work (see there)."""
    from bertrt.serve.engine import RunStats

    seq_len = min(MAX_SEQ_LEN, engine.max_length) if max_seq_len is None else max_seq_len
    if seq_len > engine.max_length:
        raise BertrtError(f"max_seq_len {seq_len} exceeds the engine's max_length "
                          f"{engine.max_length}")
    check_settings(seq_len, doc_stride, max_query_length, max_answer_length, top_k,
                   longest_question=False)
    if len(questions) != len(contexts):
        raise BertrtError(f"got {len(questions)} questions but {len(contexts)} contexts "
                          "(expected one context per question)")
    for what, items in (("questions", questions), ("contexts", contexts)):
        empty = next((i for i, t in enumerate(items) if not t.strip()), None)
        if empty is not None:
            raise BertrtError(f"{what}[{empty}]: empty (expected some text)")
    stats = engine.stats = RunStats(texts=len(questions))
    began = time.perf_counter()
    tokenizer = engine.tokenizer
    encoded = encode_contexts(tokenizer, contexts)
    windows = make_windows(tokenizer, encode_questions(tokenizer, questions, max_query_length),
                           encoded, seq_len, doc_stride)
    logits = run_windows(engine, windows)
    stats.batches, stats.tokens, stats.positions = logits.batches, logits.tokens, logits.positions
    by_pair: list[list[int]] = [[] for _ in questions]
    for i, window in enumerate(windows):
        by_pair[window.pair].append(i)
    results: list[Any] = []
    for k, indices in enumerate(by_pair):
        found = best_answers([windows[i] for i in indices], [logits.start[i] for i in indices],
                             [logits.end[i] for i in indices], encoded[k], contexts[k], top_k,
                             max_answer_length, null_threshold)
        results.append(found[0] if top_k == 1 else found)
    stats.seconds = time.perf_counter() - began
    return results
