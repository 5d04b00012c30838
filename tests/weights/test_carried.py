"""Model dirs keep what bertrt does not own: a bertrt round trip of a sentence-transformers
model (the real MiniLM) gives the same embeddings in sentence-transformers and in bertrt,
saving into the source dir keeps its files, a changed vocabulary drops a stale
tokenizer.json. (`bertrt train --model DIR` carrying them: tests/train/test_model_dir.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import bertrt
from bertrt.fileio import file_mode
from bertrt.serve.engine import InferenceEngine
from bertrt.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = ["A man is playing a guitar.", "The new movie is awesome!",
         "Das ist ein Satz auf Deutsch, mit Umlauten: äöü.", "word " * 300]  # > max_seq_length
#: The files of MiniLM's dir that sentence-transformers and transformers read beside bertrt's.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling/config.json", "special_tokens_map.json", "tokenizer.json", "README.md")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)


def test_round_trip_keeps_the_sentence_transformers_model(minilm_dir: Path, reference,
                                                          tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    saved = bertrt.load(minilm_dir).save(tmp_path / "saved")
    for name in ST_FILES:
        assert (saved / name).read_bytes() == (minilm_dir / name).read_bytes(), name
        assert (saved / name).stat().st_mode & 0o777 == file_mode(), name
    assert not (saved / ".gitattributes").exists()
    embeddings = SentenceTransformer(str(saved), device="cpu").encode(TEXTS)
    assert cosines(embeddings, reference).min() >= 1 - 1e-6
    with InferenceEngine(saved, backend="torch") as engine, pytest.warns(match="truncated"):
        ours = engine.embed(TEXTS)  # at the max_seq_length of sentence_bert_config.json
    with InferenceEngine(minilm_dir, backend="torch") as engine, pytest.warns(match="truncated"):
        theirs = engine.embed(TEXTS)
    assert cosines(ours, theirs).min() >= 1 - 1e-6
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0)  # the Normalize module is kept

    # what a save used to give: the same weights, but another model in sentence-transformers
    bare = bertrt.load(minilm_dir)
    bare.carried = None
    lost = SentenceTransformer(str(bare.save(tmp_path / "bare")), device="cpu").encode(TEXTS)
    assert np.abs(lost - reference).max() > 0.1


def test_saving_into_the_source_dir_keeps_its_files(minilm_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(minilm_dir, tmp_path / "copy"))
    before = {name: (copy / name).read_bytes() for name in ST_FILES}
    bertrt.load(copy).save(copy)
    bertrt.load(copy).save(copy)  # twice: what the first wrote is the source now
    assert {name: (copy / name).read_bytes() for name in ST_FILES} == before
    assert not any(p.name.endswith(".tmp") for p in copy.rglob("*"))


def test_a_new_vocabulary_drops_the_stale_tokenizer_json(minilm_dir: Path,
                                                         tmp_path: Path) -> None:
    copy = Path(shutil.copytree(minilm_dir, tmp_path / "copy"))
    model = bertrt.load(copy)
    model.tokenizer = Tokenizer([*SPECIAL_TOKENS, "only", "a", "few", "words"])
    model.save(tmp_path / "other")
    model.save(copy)  # into the source: its tokenizer.json described the old vocabulary
    for folder in (tmp_path / "other", copy):
        assert not (folder / "tokenizer.json").exists(), folder
        assert (folder / "modules.json").read_bytes() == (minilm_dir / "modules.json"
                                                           ).read_bytes()
        assert bertrt.load(folder).tokenizer.vocab_size == 9
    model.tokenizer = Tokenizer.from_dir(minilm_dir)  # the old one again: so is its file
    model.save(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (
        minilm_dir / "tokenizer.json").read_bytes()
