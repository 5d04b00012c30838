"""Fixtures for the tokenizer tests: the reference tokenizers (MiniLM's dir: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def uncased_vocab(minilm_dir: Path) -> Path:
    return minilm_dir / "vocab.txt"
