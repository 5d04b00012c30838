"""What the server asks of the model: tokenize a request, read its rows of a batch, shape the
results. A thin layer over `InferenceEngine`'s tokenizer, limits and backend (the engine's own
calls tokenize and run in one go; the server splits the two across threads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bertrt.errors import BertrtError
from bertrt.serve.engine import InferenceEngine
from bertrt.serve.http.batcher import BatchView
from bertrt.serve.http.errors import HttpError
from bertrt.serve.outputs import SequenceOutputs, check_pooling
from bertrt.serve.tagging import entities, words
from bertrt.serve.workload import Request

#: The inference routes, by what the model's head must be ("any": every head has hidden
#: states to pool).
ROUTE_HEADS: dict[str, tuple[str, ...]] = {
    "/embed": ("any",), "/v1/embeddings": ("any",), "/predict": ("classification",),
    "/tag": ("token-classification",), "/tokenize": ("any",)}
#: What each head is, and the routes that answer it, for the 404 of the others.
HEADS: dict[str, tuple[str, str]] = {
    "none": ("an encoder without a task head", "/embed and /v1/embeddings"),
    "pretraining": ("a pretraining model (MLM and NSP heads)", "/embed and /v1/embeddings"),
    "classification": ("a sequence classifier", "/predict (and /embed)"),
    "token-classification": ("a token classifier (a tagger)", "/tag (and /embed)")}


@dataclass
class Encoded:
    """A request's inputs, tokenized."""

    requests: list[Request]
    #: (L, 2) character spans per sequence, when asked for.
    offsets: list[np.ndarray] | None
    truncated: int

    @property
    def tokens(self) -> int:
        return sum(r.length for r in self.requests)


class ModelService:
    """The engine as the routes use it.

    Args:
        engine: The engine (its backend runs the batches).
        pooling: The embedding routes' pooling (None: the model's default).
    """

    def __init__(self, engine: InferenceEngine, pooling: str | None = None) -> None:
        self.engine = engine
        self.head = engine.head
        self.max_length = engine.max_length
        #: Why the embedding routes cannot pool as the model's config says (None: they can).
        self.embed_refusal: str | None = None
        if pooling is not None:
            self.pooling = check_pooling(pooling)
        else:
            self.pooling = engine.defaults.pooling
            self.embed_refusal = engine.defaults.unsupported
        self.labels = engine.labels

    def run_narrow(self, requests: list[Request]) -> SequenceOutputs:
        """`run` on the backend's single-thread session (`Backend.narrow`), which several
        engine threads call at once."""
        narrow = self.engine.backend.narrow
        assert narrow is not None
        return narrow.run_sequences(requests, self.engine.tokenizer.pad_id)

    def run(self, requests: list[Request]) -> SequenceOutputs:
        """Run one batch (on the engine thread)."""
        return self.engine.backend.run_sequences(requests, self.engine.tokenizer.pad_id)

    def require(self, route: str) -> None:
        """Refuse a route the head does not answer (404, naming what the model does)."""
        heads = ROUTE_HEADS[route]
        if "any" in heads or self.head in heads:
            if route in ("/embed", "/v1/embeddings") and self.embed_refusal:
                raise HttpError("validation", f"{route}: {self.embed_refusal} (start the "
                                "server with --pooling mean|cls|max)")
            return
        what, routes = HEADS[self.head]
        need = HEADS[heads[0]][0]
        raise HttpError("not_supported", f"{route} needs {need}; this model is {what} "
                        f"({self.head} head): use {routes}")

    # ------------------------------------------------------------------ tokenizing
    def encode(self, texts: list[str], pairs: Sequence[str | None] | None = None, *,
               truncate: bool, offsets: bool = False) -> Encoded:
        """Tokenize a request's inputs (in a worker thread); `pairs` may hold None for the
        inputs of a batch that are single texts.

        Raises:
            HttpError: input_too_long for an input over the maximum length when `truncate`
                is false; validation for text the tokenizer refuses (a lone surrogate).
        """
        if pairs is not None and any(p is None for p in pairs):  # singles and pairs mixed
            single = [i for i, p in enumerate(pairs) if p is None]
            double = [i for i, p in enumerate(pairs) if p is not None]
            parts = [self._encode([texts[i] for i in single], None, truncate, offsets, single),
                     self._encode([texts[i] for i in double], [pairs[i] for i in double],
                                  truncate, offsets, double)]
            where = {i: (part, j) for part, index in zip(parts, (single, double))
                     for j, i in enumerate(index)}
            order = [where[i] for i in range(len(texts))]
            return Encoded([part.requests[j] for part, j in order],
                           [part.offsets[j] for part, j in order] if offsets else None,
                           sum(part.truncated for part in parts))
        return self._encode(texts, pairs, truncate, offsets, range(len(texts)))

    def _encode(self, texts: list[str], pairs: Sequence[str | None] | None, truncate: bool,
                offsets: bool, names: Sequence[int]) -> Encoded:
        """`encode` of texts that are all single or all pairs; `names` are their positions
        in the request (for the errors)."""
        tok, limit = self.engine.tokenizer, self.max_length
        if not texts:
            return Encoded([], [] if offsets else None, 0)
        try:
            if truncate:
                chunk = self.engine.encode(texts, pairs, offsets, 0)  # type: ignore[arg-type]
                return Encoded(chunk.requests, chunk.offsets, chunk.truncated)
            enc = tok(texts, pairs, padding=False, truncation=False, return_offsets=offsets)
        except BertrtError as exc:
            raise HttpError("validation", str(exc)) from None
        for i, ids in zip(names, enc["input_ids"]):
            if len(ids) > limit:
                raise HttpError("input_too_long", f"inputs[{i}]: {len(ids)} tokens, over the "
                                f"model's maximum of {limit}; send \"truncate\": true, or "
                                "start the server with --auto-truncate")
        requests = [Request(i, t) for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
        return Encoded(requests, enc.get("offsets"), 0)

    def tokens(self, texts: list[str], add_special_tokens: bool) -> list[list[dict[str, Any]]]:
        """TEI's /tokenize: per text, `{"id", "text", "special", "start", "stop"}` per token
        (character offsets; a special token's text is its name and its offsets null)."""
        tok = self.engine.tokenizer
        try:
            enc = tok(texts, padding=False, truncation=False, return_offsets=True)
        except BertrtError as exc:
            raise HttpError("validation", str(exc)) from None
        out = []
        for text, ids, spans in zip(texts, enc["input_ids"], enc["offsets"]):
            last = len(ids) - 1
            row = []
            for j in range(len(ids)) if add_special_tokens else range(1, last):
                token, (start, stop) = int(ids[j]), (int(spans[j][0]), int(spans[j][1]))
                special = j in (0, last)  # [CLS], [SEP]; an [UNK] inside is the text's
                row.append({"id": token, "special": special,
                            "text": tok.id_to_token(token) if special else text[start:stop],
                            "start": None if special else start,
                            "stop": None if special else stop})
            out.append(row)
        return out

    # ------------------------------------------------------------------ reading a batch
    def read_pooled(self, view: BatchView, rows: np.ndarray) -> Sequence[np.ndarray]:
        return list(view.pooled(self.pooling)[rows])

    @staticmethod
    def read_logits(view: BatchView, rows: np.ndarray) -> Sequence[np.ndarray]:
        return list(view.outputs.sequences("logits")[rows])

    @staticmethod
    def read_token_logits(view: BatchView, rows: np.ndarray) -> Sequence[np.ndarray]:
        return [np.array(view.outputs.tokens("logits", int(r))) for r in rows]

    # ------------------------------------------------------------------ shaping results
    @staticmethod
    def embeddings(parts: list[np.ndarray], normalize: bool) -> np.ndarray:
        """(N, H) float32; L2-normalized as `InferenceEngine.embed` normalizes."""
        out = np.stack(parts).astype(np.float32, copy=False)
        if normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def scores(self, parts: list[np.ndarray], raw: bool) -> list[list[dict[str, Any]]]:
        """TEI's /predict: per input, every label `{"label", "score"}`, best first; scores are
        softmax probabilities (one logit: its sigmoid), or the logits with `raw`."""
        out = []
        for logits in parts:
            logits = logits.astype(np.float64)
            if raw:
                values = logits
            elif logits.shape[0] == 1:
                values = 1.0 / (1.0 + np.exp(-logits))
            else:
                values = _softmax(logits)
            order = np.argsort(-values, kind="stable")
            out.append([{"label": self.labels.get(int(k), str(k)), "score": float(values[k])}
                        for k in order])
        return out

    def entities(self, parts: list[np.ndarray], encoded: Encoded,
                 texts: list[str]) -> list[list[dict[str, Any]]]:
        """Per text, its entities as `InferenceEngine.tag` gives them."""
        assert encoded.offsets is not None
        pieces = self.engine.wordpieces()
        out = []
        for logits, request, spans, text in zip(parts, encoded.requests, encoded.offsets,
                                                texts):
            probs = _softmax(logits.astype(np.float64))  # (L, C)
            found = words([pieces[t] for t in request.input_ids], spans, probs, self.labels)
            out.append(entities(found, text))
        return out

    def info(self) -> dict[str, Any]:
        """The model's part of /info."""
        engine = self.engine
        if self.head in ("classification", "token-classification"):
            kind = "classifier" if self.head == "classification" else "tagger"
            model_type: dict[str, Any] = {kind: {"id2label": {
                str(k): v for k, v in sorted(self.labels.items())}}}
        else:
            model_type = {"embedding": {"pooling": self.pooling}}
        return {"model_id": engine.source, "head": self.head, "model_type": model_type,
                "routes": [r for r, heads in ROUTE_HEADS.items()
                           if "any" in heads or self.head in heads],
                "hidden_size": engine.hidden_size, "max_input_length": self.max_length,
                "backend": engine.backend_name,
                "backend_description": engine.backend.description,
                "precision": engine.precision, "packed": engine.packed,
                "threads": engine.threads}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
