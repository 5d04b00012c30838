"""Fixtures for the training tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import bertrt
from bertrt.tokenizer import SPECIAL_TOKENS, Tokenizer


def _word_tokenizer(*texts: Path) -> Tokenizer:
    """A vocabulary of exactly the words of `texts` (deterministic, unlike a trained one)."""
    words = {w for path in texts for w in path.read_text().split()}
    return Tokenizer([*SPECIAL_TOKENS, *sorted(words)])


@pytest.fixture(scope="session")
def word_tokenizer() -> Callable[..., Tokenizer]:
    """`word_tokenizer(*paths)`: a tokenizer whose vocabulary is exactly those files' words."""
    return _word_tokenizer


def _save_model(tok: Tokenizer, path: Path, *, hidden: int = 32, heads: int = 2, layers: int = 2,
                max_positions: int = 64, dropout: float = 0.1, head: str = "pretraining") -> Path:
    """A small model (seed 0, FFN 2 x hidden) with `tok`'s vocabulary, saved at `path`."""
    config = bertrt.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, num_attention_heads=heads,
        num_hidden_layers=layers, intermediate_size=2 * hidden,
        max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout)
    bertrt.Model.from_config(config, head=head, seed=0, tokenizer=tok).save(path)
    return path


@pytest.fixture(scope="session")
def save_model() -> Callable[..., Path]:
    """`save_model(tok, path, hidden=, heads=, layers=, max_positions=, dropout=, head=)`."""
    return _save_model
