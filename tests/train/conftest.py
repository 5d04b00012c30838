"""Fixtures for the training tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bertrt.tokenizer import SPECIAL_TOKENS, Tokenizer


def _word_tokenizer(*texts: Path) -> Tokenizer:
    """A vocabulary of exactly the words of `texts` (deterministic, unlike a trained one)."""
    words = {w for path in texts for w in path.read_text().split()}
    return Tokenizer([*SPECIAL_TOKENS, *sorted(words)])


@pytest.fixture(scope="session")
def word_tokenizer() -> Callable[..., Tokenizer]:
    """`word_tokenizer(*paths)`: a tokenizer whose vocabulary is exactly those files' words."""
    return _word_tokenizer
