"""`InferenceEngine`: texts in; embeddings, labels or entities out, in input order.

    texts ──tokenize (CHUNK_TEXTS at a time)──▶ sequences ──sort by length, longest first──▶
    batches cut by a token budget ──backend.run_sequences──▶ SequenceOutputs ──pool | softmax |
    BIO spans──▶ results, each at its text's position

A backend receives each batch as unpadded sequences and decides the layout: padded to the
batch's longest (the batch then costs B × Smax positions of the budget), or packed (a packed
export, the packed torch lowering: the real tokens only, costing their sum).

    >>> engine = InferenceEngine("model-dir", backend="ort", threads=2)
    >>> engine.embed(["a text", "another one"]).shape
    (2, 384)
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bertrt.config import BertConfig
from bertrt.errors import BertrtError
from bertrt.serve.backends import (
    FLAVOURS,
    Backend,
    BackendUnavailable,
    make_backend,
)
from bertrt.serve.outputs import SequenceOutputs, check_pooling
from bertrt.serve.pooling import embedding_defaults
from bertrt.serve.selection import (
    ACCURACY,
    RUNS,
    STREAMS,
    Candidate,
    Trial,
    auto_candidates,
    probe_requests,
    remember,
    remembered,
    time_backend,
    with_streams,
)
from bertrt.serve.tagging import entities, words
from bertrt.serve.workload import Request

if TYPE_CHECKING:
    from bertrt.model import Model
    from bertrt.onnx_info import OnnxInfo
    from bertrt.tokenizer import Tokenizer

PathLike = str | os.PathLike[str]

#: Names `backend=` takes.
ENGINE_BACKENDS: tuple[str, ...] = ("auto", "ort", "ort-cuda", "openvino", "torch")
#: Names `precision=` takes (which backend runs which: `bertrt.serve.selection.RUNS`).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8", "fp16")
#: Whether `packed=None` runs padding-free, by backend. Measured on MiniLM (2 threads, real
#: text, each backend at its default budget; docs/inference.md): ONNX Runtime's CPU provider
#: embeds 1.15x faster packed than padded (int8 1.6x), OpenVINO 2.4x; the torch lowering 0.8x
#: (its eager gathers around each attention core cost more than the padding saves); CUDA is
#: not measured yet, so it stays padded.
PACKED_BY_DEFAULT = {"ort": True, "ort-cuda": False, "openvino": True, "torch": False}
#: Texts tokenized (and length-sorted) together: bounds the memory of a long input.
CHUNK_TEXTS = 4096
#: Inputs at least this long get a progress bar (on a terminal, unless `progress=` says).
PROGRESS_MIN_TEXTS = 512

#: The outputs the engine reads, by head: `embed` pools the hidden states of every head
#: (`Backend.read_only`: an encoder's pooler is then not run).
READS = {"none": ("last_hidden_state",), "pretraining": ("last_hidden_state",),
         "classification": ("last_hidden_state", "logits"),
         "token-classification": ("last_hidden_state", "logits"),
         "question-answering": ("last_hidden_state", "start_logits", "end_logits")}
#: What each head is, and the call that serves it, for the errors of the others.
_HEADS = {"none": ("an encoder without a task head", "embed()"),
          "pretraining": ("a pretraining model (MLM and NSP heads)", "embed()"),
          "classification": ("a sequence classifier", "predict()"),
          "token-classification": ("a token classifier (a tagger)", "tag()"),
          "question-answering": ("an extractive question-answering model", "answer()")}


class TruncatedWarning(UserWarning):
    """Some texts were longer than the engine's maximum length and were truncated."""


@dataclass
class RunStats:
    """What the last call did."""

    texts: int = 0
    #: Texts longer than `max_length`, truncated.
    truncated: int = 0
    batches: int = 0
    #: Real tokens (specials included) run.
    tokens: int = 0
    #: Positions computed: B × Smax summed over padded batches, the tokens for packed ones.
    positions: int = 0
    seconds: float = 0.0


def batch_cost(lengths: Sequence[int] | np.ndarray, packed: bool) -> int:
    """Positions a batch of sequences of `lengths` computes: their sum packed, size x the
    longest padded."""
    return int(sum(lengths)) if packed else len(lengths) * int(max(lengths))


def token_budget_batches(lengths: np.ndarray, budget: int, packed: bool = False
                         ) -> list[slice]:
    """Cut sequences sorted longest first into consecutive batches within a token budget.

    A padded batch costs B × its first (longest) length; a packed one the sum of its lengths.
    Each batch is as long as the budget allows; a sequence over the budget runs alone.

    Args:
        lengths: (N,) lengths, non-increasing.
        budget: Positions a batch may cost (at least 1).
        packed: Cost the real tokens instead of the padded rectangle.
    """
    cuts: list[slice] = []
    start, n = 0, len(lengths)
    while start < n:
        if packed:
            # the longest prefix whose sum fits (at least one sequence)
            total = np.cumsum(lengths[start:])
            size = max(1, int(np.searchsorted(total, budget, side="right")))
        else:
            size = max(1, budget // max(int(lengths[start]), 1))
        end = min(n, start + size)
        cuts.append(slice(start, end))
        start = end
    return cuts


def length_sorted_batches(lengths: np.ndarray, budget: int, packed: bool = False
                          ) -> list[np.ndarray]:
    """The batches the engine runs sequences of `lengths` (in any order) in: sorted longest
    first, cut by `token_budget_batches`. Returns each batch's indices into `lengths`."""
    if len(lengths) == 1:  # a query: nothing to sort or cut
        return [np.zeros(1, dtype=np.int64)]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[part] for part in token_budget_batches(lengths[order], budget, packed)]


@dataclass
class Chunk:
    """Tokenized texts: the sequences, their character offsets (when asked), truncations."""

    requests: list[Request]
    offsets: list[np.ndarray] | None
    truncated: int


class InferenceEngine:
    """Run a BERT model over texts: `embed`, `predict` (a classifier), `tag` (a tagger).

    Args:
        model: A Hugging Face-layout model dir (for ONNX Runtime it is exported to a temporary
            ONNX file with bertrt's own lowering, removed once loaded), an `.onnx` file bertrt
            exported (its metadata gives the config and head; the tokenizer comes from `vocab`,
            else from the folder holding the file), or a `bertrt.Model`.
        backend: "ort" (ONNX Runtime, CPU), "ort-cuda" (its CUDA provider), "openvino"
            (OpenVINO's CPU plugin, on the standard-flavour export), "torch" (bertrt's torch
            lowering; needs the weights: a model dir or a `Model`), or "auto": the fastest of
            the installed CPU runtimes at the precisions `precision` admits, timed at load
            (`bertrt.serve.selection`; `trials` and `description` say what was chosen).
        precision: "fp32"; "int8" (ONNX Runtime on the CPU: the dynamic int8 export of
            `export_onnx(int8=True)`, cosine ≥ 0.99 to fp32); "bf16" (OpenVINO, where the CPU
            has native bf16: cosine ≥ 0.999); "fp16" (ONNX Runtime on CUDA, an fp16 export).
            With backend "auto", the loosest precision accepted: "bf16" admits fp32 and bf16,
            "int8" all three, whichever runs fastest.
        packed: Padding-free batches (the packed export, or the packed torch lowering): each
            batch computes its real tokens only; False: each batch padded to its longest.
            None: what an `.onnx` file is; for a model dir, the faster layout of the backend
            (`PACKED_BY_DEFAULT`: packed on ONNX Runtime's CPU provider, padded on torch).
        threads: Intra-op threads (None: the runtime's default; torch's count is
            process-wide, set for the engine's life and restored by `close`).
        max_batch_tokens: A batch's budget of positions: B × Smax for a padded batch, its real
            tokens for a packed one; a text longer than the budget runs alone. None: the
            backend's `batch_tokens` (on CPU small, where activations stay in cache: 512 on
            ONNX Runtime, 2048 on OpenVINO and torch; 16384 on CUDA).
        vocab: For an `.onnx` file: a `vocab.txt` (uncased), the model dir it was exported
            from (its tokenizer settings and sentence-transformers config), or a `Tokenizer`.
        max_length: Truncate texts to this many tokens, specials included (default: the
            smallest of the model's positions, the tokenizer's `model_max_length` and, for
            an encoder (embed), sentence-transformers' `max_seq_length`).
        padded_single: For a packed ONNX backend on a model dir, also load the padded export
            and run batches of one sequence on it (`Backend.single`): a single query has no
            padding to skip, and the padded graph none of the packing gathers (MiniLM, one
            16-token query: 12% less CPU time). Costs the weights' memory twice; False:
            everything runs packed.
        yield_cores: ONNX Runtime's threads stop spinning when a run ends, giving the cores
            back to the process's other threads between runs (`bertrt serve` sets it: its
            HTTP and tokenization need them); False (a lone caller): they spin on a while,
            which makes back-to-back single queries ~6% faster. Ignored where `streams`
            gives the backend a narrow session: that one takes the load, and the wide one,
            running lone queries on idle cores, is faster left to spin.
        streams: Batches a caller may run at once, one per core (`bertrt serve` under load):
            above 1, a packed ONNX Runtime or OpenVINO CPU backend also loads a narrow one
            of the same export (`Backend.narrow`; the weights' memory once more) that many
            threads call at once: a single-thread ONNX Runtime session, or the model compiled
            to that many OpenVINO streams of one thread; `streams` says how many the engine
            supports (1 on other backends). Each call of the engine itself still runs on
            `threads`.

    Raises:
        BertrtError: one line: a bad argument, a missing or unreadable model, a vocabulary
            that is not the one the `.onnx` file was exported with, a backend this machine or
            model cannot run.
    """

    def __init__(self, model: PathLike | Model, backend: str = "auto", precision: str = "fp32",
                 packed: bool | None = None, threads: int | None = None,
                 max_batch_tokens: int | None = None, *,
                 vocab: PathLike | Tokenizer | None = None,
                 max_length: int | None = None, padded_single: bool = True,
                 yield_cores: bool = False, streams: int = 1) -> None:
        _check_options(backend, precision, threads, max_batch_tokens, max_length)
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise BertrtError(f"streams: expected a positive integer, got {streams!r}")
        self._streams = streams
        self._twin = bool(padded_single)
        self._yield = bool(yield_cores)
        weights, info, self.source = _open_model(model)
        if info is not None:
            packed = _check_file(info, packed, precision, backend)
        if weights is not None:
            if vocab is not None:
                raise BertrtError("vocab= is for an .onnx file; a model dir or Model brings "
                                  "its own tokenizer")
            self.config, self.head = weights.config, weights.head
            self.tokenizer = weights.tokenizer
            self.defaults = embedding_defaults(model if _is_dir(model) else None)
        else:
            assert info is not None
            self.config, self.head = _onnx_config(info)
            self.tokenizer, tokenizer_dir = _onnx_tokenizer(info, vocab)
            self.defaults = embedding_defaults(tokenizer_dir)
        self.max_length = self._limit(max_length)
        self.labels: dict[int, str] = self.config.id2label
        #: The candidates `backend="auto"` timed, fastest first (empty: nothing was timed).
        self.trials: list[Trial] = []
        if backend == "auto":
            choice = self._choose(model, weights, info, precision, packed, threads)
        else:
            choice = _check_runs(Candidate(backend, precision), weights is not None)
            self.backend = self._start(choice, weights, info, threads, packed)
        self.backend_name, self.precision = choice.backend, choice.precision
        self.max_batch_tokens = max_batch_tokens or self.backend.batch_tokens
        self.threads = threads
        #: What the last `embed` / `predict` / `tag` call did.
        self.stats = RunStats()
        self._pieces: list[str] | None = None

    # ------------------------------------------------------------------ description
    @property
    def packed(self) -> bool:
        """Whether the backend runs batches padding-free (they then cost their real tokens)."""
        return self.backend.packed

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def description(self) -> str:
        """One line: the model, its head, the backend and how batches are run."""
        layout = "packed" if self.packed else "padded"
        chosen = f" ({self.choice})" if self.choice else ""
        return (f"{self.source} ({self.head} head) on {self.backend.description}, "
                f"{self.precision}, {layout} batches of up to {self.max_batch_tokens} "
                f"positions, max_length {self.max_length}{chosen}")

    @property
    def choice(self) -> str:
        """What `backend="auto"` timed, fastest first ("" when nothing was timed)."""
        if not self.trials:
            return ""
        return ("auto: fastest of " + ", ".join(map(str, self.trials))
                + " per probe batch+query")

    def _choose(self, model: Any, weights: Model | None, info: OnnxInfo | None,
                precision: str, packed: bool | None, threads: int | None) -> Candidate:
        """Start the fastest candidate `backend="auto"` admits (`self.backend`)."""
        candidates = auto_candidates(
            precision, None if info is None else info.precision,
            None if info is None else info.metadata.get("flavour"))
        if not candidates:
            if weights is None and not auto_candidates(precision):
                raise BertrtError("an .onnx model needs onnxruntime (or openvino); install "
                                  "bertrt[cpu]")
            raise BertrtError(f"no installed backend runs precision {precision} on this "
                              "machine (onnxruntime: fp32, int8; openvino: fp32, and bf16 "
                              "where the CPU has native bf16)")
        if self._streams > 1:
            candidates = with_streams(candidates)
        key = _model_key(model, precision, packed, threads, self._streams)
        known = remembered(key)
        if known in candidates or len(candidates) == 1:
            choice = known if known in candidates else candidates[0]
            self.backend = self._start(choice, weights, info, threads, packed)
            return choice
        batch, query = probe_requests(int(self.config.vocab_size), _first_word_id(self),
                                      self.max_length)
        best: tuple[Trial, Backend] | None = None
        pad = self.tokenizer.pad_id
        for candidate in candidates:
            backend = self._start(candidate, weights, info, threads, packed)
            trial = Trial(candidate, *time_backend(backend, batch, query, pad, self._streams))
            self.trials.append(trial)
            if best is None or trial.score < best[0].score:
                if best is not None:
                    _retire(best[1])
                best = (trial, backend)
            else:
                _retire(backend)
        assert best is not None
        self.trials.sort(key=lambda t: t.score)
        self.backend = best[1]
        remember(key, best[0].candidate)
        return best[0].candidate

    def _start(self, choice: Candidate, weights: Model | None, info: OnnxInfo | None,
               threads: int | None, packed: bool | None) -> Backend:
        """A backend for `choice` that returns only the outputs the engine reads."""
        backend = _start_backend(choice, weights, info, threads, packed, self._twin,
                                 self._yield, self._streams)
        for one in (backend, backend.narrow):
            if one is not None:
                one.read_only(READS[self.head])
        return backend

    @property
    def streams(self) -> int:
        """Batches a server may run at once: `streams` where the backend has a narrow
        session (`Backend.narrow`), else 1."""
        return self._streams if self.backend.narrow is not None else 1

    def __repr__(self) -> str:
        return f"InferenceEngine({self.description})"

    def close(self) -> None:
        """Release the backend (and restore torch's thread count)."""
        _close(self.backend)

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def embed(self, texts: str | Iterable[str], pooling: str | None = None,
              normalize: bool | None = None, *, progress: bool | None = None) -> np.ndarray:
        """One vector per text: the final hidden states pooled over each text's tokens.

        Args:
            texts: The texts (a str is one text).
            pooling: "mean" or "max" over the real tokens (`[CLS]` and `[SEP]` included, as
                sentence-transformers pools), or "cls" (the `[CLS]` token's hidden state, not
                the pooler output). None: the model dir's sentence-transformers config, else
                "cls".
            normalize: L2-normalize each vector. None: True when the sentence-transformers
                config has a Normalize module, else False.
            progress: A progress bar on stderr (None: on a terminal, for long inputs).

        Returns:
            (N, H) float32, row i for texts[i].
        """
        if pooling is None:
            if self.defaults.unsupported:
                raise BertrtError(self.defaults.unsupported)
            pooling = self.defaults.pooling
        check_pooling(pooling)
        normalize = self.defaults.normalize if normalize is None else bool(normalize)
        items = _as_texts(texts, "texts")
        out = np.empty((len(items), self.hidden_size), dtype=np.float32)

        def consume(rows: np.ndarray, outputs: SequenceOutputs, chunk: Chunk,
                    picked: np.ndarray) -> None:
            out[rows] = outputs.pool("last_hidden_state", pooling)

        self._run(items, None, consume, "embed", progress)
        if normalize:  # as torch.nn.functional.normalize: divide by max(norm, eps)
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def predict(self, texts: str | Iterable[str], pairs: str | Iterable[str] | None = None,
                raw_scores: bool = False, *, progress: bool | None = None
                ) -> list[dict[str, Any]]:
        """The label of each text (or text pair) by a sequence classifier.

        Args:
            texts: The texts.
            pairs: Second texts, one per text (a cross-encoder's pairs), or None.
            raw_scores: Add `logits`, the raw scores of every label in id order.
            progress: As for `embed`.

        Returns:
            One `{"label", "score"}` per text: the most likely label (`id2label`) and its
            softmax probability (a single-logit model: its sigmoid); a regression model
            (`problem_type` "regression" in config.json) gives `{"score"}`, its raw output.
        """
        self._require("classification", "predict()")
        items = _as_texts(texts, "texts")
        pair_items = None if pairs is None else _as_texts(pairs, "pairs")
        if pair_items is not None and len(pair_items) != len(items):
            raise BertrtError(f"got {len(items)} texts but {len(pair_items)} pairs (expected "
                              "one pair per text)")
        results: list[dict[str, Any]] = [{} for _ in items]
        regression = self.config.extra.get("problem_type") == "regression"

        def consume(rows: np.ndarray, outputs: SequenceOutputs, chunk: Chunk,
                    picked: np.ndarray) -> None:
            logits = outputs.sequences("logits").astype(np.float64)  # (B, C)
            if regression:
                for b, row in enumerate(rows):
                    results[row] = {"score": float(logits[b, 0])}
                return
            probs = _sigmoid(logits) if logits.shape[1] == 1 else _softmax(logits)
            best = probs.argmax(axis=1)
            for b, (row, label) in enumerate(zip(rows, best)):
                result: dict[str, Any] = {"label": self.labels.get(int(label), str(label)),
                                          "score": float(probs[b, label])}
                if raw_scores:
                    result["logits"] = logits[b].tolist()
                results[row] = result

        self._run(items, pair_items, consume, "predict", progress)
        return results

    def tag(self, texts: str | Iterable[str], *, progress: bool | None = None
            ) -> list[list[dict[str, Any]]]:
        """The entities of each text by a token classifier.

        Each word takes the label of its first wordpiece; words are merged into entities by
        their BIO (IOB2) labels (`bertrt.serve.tagging`).

        Returns:
            Per text, its entities in order: `{"entity", "start", "end", "text", "score"}`,
            `start`/`end` character offsets into the text (`text[start:end]`), `score` the
            mean probability of the entity's words' labels.
        """
        self._require("token-classification", "tag()")
        items = _as_texts(texts, "texts")
        results: list[list[dict[str, Any]]] = [[] for _ in items]
        pieces = self.wordpieces()

        def consume(rows: np.ndarray, outputs: SequenceOutputs, chunk: Chunk,
                    picked: np.ndarray) -> None:
            assert chunk.offsets is not None
            for b, (row, i) in enumerate(zip(rows, picked)):
                ids = chunk.requests[i].input_ids
                probs = _softmax(outputs.tokens("logits", b).astype(np.float64))  # (L, C)
                found = words([pieces[t] for t in ids], chunk.offsets[i], probs, self.labels)
                results[row] = entities(found, items[row])

        self._run(items, None, consume, "tag", progress, offsets=True)
        return results

    def answer(self, questions: str | Iterable[str], contexts: str | Iterable[str],
               top_k: int = 1, **settings: Any) -> list[Any]:
        """The answer span of each question in its context, by an extractive QA model.

        Contexts longer than a window are split into overlapping windows; the best spans of
        all of a pair's windows compete (`bertrt.serve.qa`: windows, scores, the null answer).

        Args:
            questions: The questions.
            contexts: One context per question.
            top_k: Answers per question.
            **settings: `max_answer_length` (15 tokens), `doc_stride` (128: the context tokens
                consecutive windows share), `max_seq_len` (a window's tokens: 384, or
                `max_length` if smaller), `max_query_length` (64: longer questions are cut),
                `null_threshold` (None: always a span; a number: the null answer "" is given
                when its score exceeds the best span's by more), all as transformers'
                question-answering pipeline defaults them.

        Returns:
            Per question `{"answer", "score", "start", "end"}` (`contexts[i][start:end]` is
            the answer); with `top_k` > 1 a list of up to `top_k` of them, best first.
        """
        from bertrt.serve import qa

        self._require("question-answering", "answer()")
        return qa.answer(self, _as_texts(questions, "questions"), _as_texts(contexts, "contexts"),
                         top_k, **settings)

    # ------------------------------------------------------------------ internals
    def _require(self, head: str, call: str) -> None:
        if self.head == head:
            return
        what, use = _HEADS[self.head]
        raise BertrtError(f"{call} needs {_HEADS[head][0]}; {self.source} is {what} "
                          f"({self.head} head): use {use}")

    def _limit(self, max_length: int | None) -> int:
        positions = int(self.config.max_position_embeddings)
        if max_length is not None:
            if max_length > positions:
                raise BertrtError(f"max_length {max_length} exceeds the model's "
                                  f"max_position_embeddings={positions}")
            return max_length
        # sentence-transformers' max_seq_length is how its embeddings were made: it binds the
        # embedding heads, not a classifier, tagger or reader fine-tuned from such a model
        embeds = self.head in ("none", "pretraining")
        return min(x for x in (positions, self.tokenizer.model_max_length,
                               self.defaults.max_length if embeds else None) if x)

    def wordpieces(self) -> list[str]:
        """The vocabulary's tokens in id order (the server's `/tokenize` and `tag` read it)."""
        if self._pieces is None:
            vocab = self.tokenizer.vocab
            self._pieces = sorted(vocab, key=vocab.__getitem__)
        return self._pieces

    def encode(self, texts: list[str], pairs: list[str] | None, offsets: bool,
               first: int) -> Chunk:
        """Tokenize as the engine's calls do (the server tokenizes through it): without
        truncation, then again at `max_length` only the texts over it (so they are counted;
        the tokenizer truncates pairs longest-first). `first`: the position of `texts[0]` in
        the whole input, for errors."""
        from bertrt.tokenizer import TokenizerError

        tok, limit = self.tokenizer, self.max_length
        try:
            enc = tok(texts, pairs, padding=False, truncation=False, return_offsets=offsets)
            over = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > limit]
            if over:
                cut = tok([texts[i] for i in over],
                          None if pairs is None else [pairs[i] for i in over],
                          padding=False, max_length=limit, return_offsets=offsets)
                for key in enc:
                    for j, i in enumerate(over):
                        enc[key][i] = cut[key][j]
        except TokenizerError:
            _name_bad_text(texts, pairs, first)
            raise
        requests = [Request(i, t) for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
        return Chunk(requests, enc.get("offsets"), len(over))

    def _run(self, texts: list[str], pairs: list[str] | None,
             consume: Callable[[np.ndarray, SequenceOutputs, Chunk, np.ndarray], None],
             what: str, progress: bool | None, offsets: bool = False) -> None:
        """Tokenize in chunks, sort each by length, cut by the budget, run, and hand each
        batch's outputs to `consume(rows, outputs, chunk, picked)`: `rows` the batch's
        positions in `texts`, `picked` the same within the chunk."""
        from tqdm import tqdm

        stats = self.stats = RunStats(texts=len(texts))
        start = time.perf_counter()
        if progress is None:  # tqdm: disable=None shows the bar only on a terminal
            disable = None if len(texts) >= PROGRESS_MIN_TEXTS else True
        else:
            disable = not progress
        pad_id = self.tokenizer.pad_id
        bar_or_none = (nullcontext() if disable is True else  # a query: not even a disabled bar
                       tqdm(total=len(texts), unit="text", desc=what, leave=False,
                            disable=disable))
        with bar_or_none as bar:
            for first in range(0, len(texts), CHUNK_TEXTS):
                last = first + CHUNK_TEXTS
                chunk = self.encode(texts[first:last],
                                     None if pairs is None else pairs[first:last], offsets,
                                     first)
                stats.truncated += chunk.truncated
                lengths = np.array([r.length for r in chunk.requests], dtype=np.int64)
                for picked in length_sorted_batches(lengths, self.max_batch_tokens,
                                                    self.packed):
                    outputs = self.backend.run_sequences([chunk.requests[i] for i in picked],
                                                         pad_id)
                    consume(first + picked, outputs, chunk, picked)
                    sizes = lengths[picked]
                    stats.batches += 1
                    stats.tokens += int(sizes.sum())
                    stats.positions += batch_cost(sizes, self.packed)
                    if bar is not None:
                        bar.update(len(picked))
        stats.seconds = time.perf_counter() - start
        if stats.truncated:
            warnings.warn(f"{stats.truncated} of {stats.texts} texts were longer than "
                          f"{self.max_length} tokens and were truncated", TruncatedWarning,
                          stacklevel=3)


# ---------------------------------------------------------------------- opening a model
def _check_options(backend: str, precision: str, threads: int | None,
                   max_batch_tokens: int | None, max_length: int | None) -> None:
    if backend not in ENGINE_BACKENDS:
        raise BertrtError(f"backend {backend!r} is unknown; expected one of "
                          f"{', '.join(ENGINE_BACKENDS)}")
    if precision not in PRECISIONS:
        raise BertrtError(f"precision {precision!r} is unknown; expected one of "
                          f"{', '.join(PRECISIONS)}")
    for value, low, name in ((threads, 1, "threads"), (max_batch_tokens, 1, "max_batch_tokens"),
                             (max_length, 2, "max_length")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            raise BertrtError(f"{name}: expected an integer of at least {low}, got {value!r}")


def _is_dir(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and Path(model).is_dir()


def _open_model(model: PathLike | Model) -> tuple[Model | None, OnnxInfo | None, str]:
    """(weights, None, name) for a model dir or `Model`; (None, info, name) for an .onnx."""
    from bertrt.model import Model

    if isinstance(model, Model):
        return model, None, "Model"
    if not isinstance(model, (str, os.PathLike)):
        raise BertrtError(f"model: expected a model dir, an .onnx file or a bertrt.Model, "
                          f"got {type(model).__name__}")
    path = Path(model)
    if path.is_dir():
        return Model.load(path), None, str(path)
    if not path.exists():
        raise BertrtError(f"{path}: no such file or directory (expected a model dir or an "
                          ".onnx file)")
    from bertrt.onnx_info import describe

    return None, describe(path), str(path)


def _check_file(info: OnnxInfo, packed: bool | None, precision: str, backend: str) -> bool:
    """Whether an .onnx file is packed; its layout must be the one asked for, and it must run
    at `precision` (an fp32 file runs at bf16 on OpenVINO; with backend "auto", at any
    precision the one asked for admits)."""
    is_packed = info.packed
    if packed is not None and packed != is_packed:
        layout = "packed" if is_packed else "padded"
        raise BertrtError(f"{info.path}: a {layout} export, but packed={packed} was asked for "
                          f"(export {'without' if is_packed else 'with'} --packed, or leave "
                          "packed unset)")
    if backend == "openvino" and info.metadata.get("flavour") == "ort":
        raise BertrtError(f"{info.path}: an ort-flavour export (com.microsoft ops), which "
                          "OpenVINO cannot read; export it with --flavour standard")
    has = info.precision
    runs = has == precision or (has == "fp32" and precision == "bf16"
                                and backend in ("openvino", "auto"))
    if backend == "auto":
        runs = ACCURACY[has] >= ACCURACY[precision]
    if not runs:
        raise BertrtError(f"{info.path}: an {has} export, but precision {precision} was asked "
                          f"for (pass precision='{has}')")
    return is_packed


def _onnx_config(info: OnnxInfo) -> tuple[BertConfig, str]:
    """The config and head bertrt's exporter wrote into the file's metadata."""
    if info.config is None:
        raise BertrtError(f"{info.path}: no bertrt config in its metadata (export it with "
                          "bertrt export)")
    config = BertConfig.from_dict(info.config, source=f"{info.path} metadata")
    head = info.metadata.get("head") or "none"
    if head not in _HEADS:
        raise BertrtError(f"{info.path}: head {head!r} in its metadata is unknown; expected "
                          f"one of {', '.join(_HEADS)}")
    return config, head


def _onnx_tokenizer(info: OnnxInfo, vocab: PathLike | Tokenizer | None
                    ) -> tuple[Tokenizer, Path | None]:
    """The tokenizer of an .onnx file (from `vocab`, else the folder holding the file), and
    the dir it came from (for its sentence-transformers config); its vocabulary must be the
    one the file was exported with."""
    from bertrt.tokenizer import Tokenizer

    folder = None
    if isinstance(vocab, Tokenizer):
        tokenizer = vocab
    elif vocab is not None:
        tokenizer = Tokenizer.from_path(vocab, "vocab")
        folder = Path(vocab) if Path(vocab).is_dir() else None
    elif any((info.path.parent / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        folder = info.path.parent
        tokenizer = Tokenizer.from_dir(folder)
    else:
        raise BertrtError(f"{info.path}: no tokenizer beside it; give vocab= (--vocab): a "
                          "vocab.txt or the model dir it was exported from")
    if not info.vocab_matches(tokenizer):
        raise BertrtError(f"{info.path}: the vocabulary given is not the one it was exported "
                          "with (vocab sha256 differs)")
    return tokenizer, folder


def _check_runs(choice: Candidate, has_weights: bool) -> Candidate:
    """`choice` as given, if its backend runs its precision and has what it needs."""
    name, precision = choice.backend, choice.precision
    if precision not in RUNS[name]:
        where = ", ".join(b for b, ps in RUNS.items() if precision in ps)
        raise BertrtError(f"precision {precision} runs on backend {where}, not on {name}")
    if name == "torch" and not has_weights:
        raise BertrtError("backend torch needs the model's weights: give the model dir "
                          "(or a Model), not an .onnx file")
    return choice


def _model_key(model: Any, *settings: Any) -> tuple | None:
    """What identifies a model file or dir for the process's memory of `auto` choices (None
    for a `Model` in memory, whose choice is not remembered)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    path = Path(model).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return (str(path), *((f.name, f.stat().st_mtime_ns) for f in files if f.is_file()),
            *settings)


def _first_word_id(engine: InferenceEngine) -> int:
    """The smallest id above the special tokens (the probe's ids are drawn above it)."""
    return min(int(engine.config.vocab_size) - 1, max(engine.tokenizer.special_ids) + 1)


#: OpenVINO candidates `auto` timed and did not keep, held until the process exits: releasing
#: a compiled model that has run, in a process where ONNX Runtime then serves from other
#: threads, crashed `bertrt serve` with SIGSEGV (4 of 16 runs; none of 10 when held).
_RETIRED: list[Backend] = []


def _retire(backend: Backend) -> None:
    """Close a candidate `auto` did not keep (OpenVINO's: hold it; see `_RETIRED`)."""
    if backend.name == "openvino":
        _RETIRED.append(backend)
    else:
        _close(backend)


def _with_narrow(backend: Backend, streams: int) -> Backend:
    """`backend`, given its narrow backend (`Backend.narrowed`) for `streams` > 1."""
    if streams > 1:
        backend.narrow = backend.narrowed(streams)
    return backend


def _close(backend: Backend) -> None:
    backend.close()
    for other in (backend.single, backend.narrow):
        if other is not None:
            other.close()


def _start_backend(choice: Candidate, weights: Model | None, info: OnnxInfo | None,
                   threads: int | None, packed: bool | None, twin: bool = False,
                   yield_cores: bool = False, streams: int = 1) -> Backend:
    """The backend: on the .onnx file as it is, or on the weights (exported to a temporary
    file in the backend's flavour, removed once the runtime holds the model); with `twin`,
    a packed ONNX one gets its padded twin for batches of one sequence (`Backend.single`);
    with `streams` > 1, a packed ONNX Runtime or OpenVINO CPU one gets a narrow backend of
    the same file for them (`Backend.narrow`)."""
    from bertrt.serve.backends import TorchBackend

    name, precision = choice.backend, choice.precision
    if packed is None:
        packed = PACKED_BY_DEFAULT[name]
    streams = streams if packed and name in STREAMS else 1
    if streams > 1:
        # the narrow session takes the load; the wide one runs a lone query on idle cores,
        # where stopping its threads after each run only makes the next query wake them:
        # MiniLM, one query every ~60 ms, 2 threads, p50 8.9 against 12.3 ms (engine) and
        # 7.4 against 8.7 ms (bertrt serve, light load)
        yield_cores = False
    try:
        if name == "torch":
            assert weights is not None
            return TorchBackend(weights, threads=threads, skip_mlm=True, packed=packed)
        if info is not None:
            backend = make_backend(name, onnx_path=info.path, model=None, threads=threads,
                                   precision=precision, yield_cores=yield_cores)
            return _with_narrow(backend, streams)
        assert weights is not None
        int8 = precision == "int8"
        with tempfile.TemporaryDirectory(prefix="bertrt-engine-") as tmp:
            layouts = [packed, False] if packed and twin else [packed]
            started = []
            for layout in layouts:
                path = weights.export_onnx(
                    Path(tmp) / f"model-{len(started)}.onnx",
                    # int8: the ort flavour's fused Attention keeps its QKV product fp32
                    flavour="standard" if int8 else FLAVOURS[name], packed=layout,
                    int8=int8, fp16=precision == "fp16",
                    # the pretraining head's per-token vocabulary logits cost more than the
                    # encoder, and the engine reads hidden states only
                    head="none" if weights.head == "pretraining" else None)
                started.append(make_backend(name, onnx_path=path, model=None,
                                            threads=threads, precision=precision,
                                            yield_cores=yield_cores))
            if len(started) == 2:
                started[0].single = started[1]
            return _with_narrow(started[0], streams)
    except BackendUnavailable as exc:
        raise BertrtError(f"backend {name}: {exc}") from None


# ---------------------------------------------------------------------- small helpers
def _as_texts(texts: Any, what: str) -> list[str]:
    """`texts` as a list of str (a str is one text); a non-str item is named."""
    if isinstance(texts, str):
        return [texts]
    if texts is None or isinstance(texts, (bytes, dict)) or not isinstance(texts, Iterable):
        raise BertrtError(f"{what}: expected a list of strings, got {type(texts).__name__}")
    items = list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise BertrtError(f"{what}[{i}]: expected a str, got {type(text).__name__}")
    return items


def _name_bad_text(texts: Sequence[str], pairs: Sequence[str] | None, first: int) -> None:
    """Raise for the first text of a chunk that is not valid Unicode (a lone surrogate),
    named by its position in the whole input."""
    for what, values in (("texts", texts), ("pairs", pairs or ())):
        for i, text in enumerate(values):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BertrtError(f"{what}[{first + i}]: character {exc.start} is a lone "
                                  f"surrogate U+{ord(text[exc.start]):04X} (not valid Unicode)"
                                  ) from None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


__all__ = ["CHUNK_TEXTS", "ENGINE_BACKENDS", "InferenceEngine",
           "PACKED_BY_DEFAULT", "PRECISIONS", "RunStats", "TruncatedWarning",
           "length_sorted_batches", "token_budget_batches"]
