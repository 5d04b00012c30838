"""From a tagger's per-token label probabilities to entity spans in the input text.

A word is a first wordpiece and the `##` pieces that follow it; it takes the label its first
piece predicts (with that piece's probability as its score) and covers the characters of all
its pieces. Words are then merged into entities by their labels' BIO (IOB2) prefixes:

- `B-X` starts an entity of type X;
- `I-X` continues the entity before it when that is of type X, else starts one (as
  Hugging Face's pipelines read a sequence that opens with `I-`);
- `O` is outside any entity; a label without a prefix (`PER`, `LABEL_1`) continues an entity
  of its own type, so neighbouring words of one label make one entity.

An entity is `{"entity": X, "start", "end", "text", "score"}`: character offsets into the
input text (`text == input[start:end]`), and the mean score of its words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

OUTSIDE = "O"


@dataclass(frozen=True)
class Word:
    """A word of the input: its character span, label and score."""

    start: int
    end: int
    label: str
    score: float


def words(pieces: Sequence[str], offsets: np.ndarray, probs: np.ndarray,
          labels: Mapping[int, str]) -> list[Word]:
    """The words of one tokenized text, its first and last tokens (`[CLS]`, `[SEP]`) left out.

    Args:
        pieces: The wordpieces (`##` marks a continuation), one per token.
        offsets: (L, 2) character spans of the tokens.
        probs: (L, C) label probabilities of the tokens.
        labels: Label names by id.
    """
    found: list[Word] = []
    best = probs.argmax(axis=-1)
    for i in range(1, len(pieces) - 1):
        start, end = int(offsets[i][0]), int(offsets[i][1])
        if pieces[i].startswith("##") and found:
            last = found[-1]
            found[-1] = Word(last.start, max(last.end, end), last.label, last.score)
            continue
        label = int(best[i])
        found.append(Word(start, end, labels[label], float(probs[i, label])))
    return found


def split_label(label: str) -> tuple[str, str]:
    """(prefix, type) of a label: `("B", "PER")`, `("I", "PER")`, `("O", "")`; a label
    without a B-/I- prefix reads as `("I", label)`."""
    if label == OUTSIDE:
        return OUTSIDE, ""
    prefix, sep, kind = label.partition("-")
    if sep and prefix in ("B", "I") and kind:
        return prefix, kind
    return "I", label


def entities(found: Sequence[Word], text: str) -> list[dict[str, Any]]:
    """Merge words into entities by their BIO labels (see the module docstring)."""
    spans: list[tuple[str, list[Word]]] = []
    open_kind: str | None = None
    for word in found:
        prefix, kind = split_label(word.label)
        if prefix == OUTSIDE:
            open_kind = None
        elif prefix == "I" and kind == open_kind:
            spans[-1][1].append(word)
        else:
            spans.append((kind, [word]))
            open_kind = kind
    return [{"entity": kind, "start": ws[0].start, "end": ws[-1].end,
             "text": text[ws[0].start: ws[-1].end],
             "score": float(np.mean([w.score for w in ws]))} for kind, ws in spans]
