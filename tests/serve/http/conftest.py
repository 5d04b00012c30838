"""Fixtures of the HTTP server's tests: tiny models of each head, their engines, and a client
of an app serving one (Starlette's test client: the app's lifespan runs, so the batcher's
threads do; no socket)."""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from bertrt import BertConfig, Model, Tokenizer
from bertrt.serve import InferenceEngine

WORDS = ["the", "cat", "sat", "on", "an", "mat", "and", "dog", "ran", "far", "away", ".", ",",
         "john", "smith", "lives", "in", "new", "york", "mary", "visited", "paris"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(string.ascii_lowercase)
         + [f"##{c}" for c in string.ascii_lowercase])
TEXTS = ["the cat sat on an mat.", "dog", "", "a dog ran far away, and the cat sat.",
         "new york", "mary visited paris and john smith lives in new york."]
#: The tagger's label of each word (all other tokens: O).
TAGS = {"john": "B-PER", "smith": "I-PER", "mary": "B-PER", "new": "B-LOC", "york": "I-LOC",
        "paris": "B-LOC"}
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
#: The tiny models' maximum length (max_position_embeddings).
MAX_LENGTH = 32


def tiny_config(**overrides: object) -> BertConfig:
    return BertConfig.preset("tiny", vocab_size=len(VOCAB), max_position_embeddings=MAX_LENGTH,
                             **overrides)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer(VOCAB)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    model = Model.from_config(tiny_config(), seed=0, tokenizer=tokenizer)
    return model.save(tmp_path_factory.mktemp("encoder") / "model")


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    config = tiny_config().with_labels(["negative", "positive", "neutral"])
    model = Model.from_config(config, head="classification", seed=3, tokenizer=tokenizer)
    with torch.no_grad():  # logits of W (pooled - their mean): labels that vary by text
        enc = {k: torch.from_numpy(v) for k, v in tokenizer(TEXTS).items()}
        pooled = model.to_torch()(**enc)["pooler_output"]
        weight = model.weights["classifier.weight"]
        weight.mul_(40.0)
        model.weights["classifier.bias"].copy_(-weight @ pooled.mean(0))
    return model.save(tmp_path_factory.mktemp("classifier") / "model")


@pytest.fixture(scope="session")
def tagger_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A tagger whose every token's label is `TAGS`' lookup (see tests/serve/test_engine.py:
    zero output projections, one-hot word embeddings, a one-hot classifier)."""
    config = tiny_config(num_hidden_layers=1).with_labels(LABELS)
    model = Model.from_config(config, head="token-classification", seed=0, tokenizer=tokenizer)
    with torch.no_grad():
        for name, tensor in model.weights.items():
            if (name.endswith(("output.dense.weight", "output.dense.bias"))
                    or "position_embeddings" in name or "token_type_embeddings" in name):
                tensor.zero_()
        table = model.weights["bert.embeddings.word_embeddings.weight"]
        table.zero_()
        for token, i in tokenizer.vocab.items():
            table[i, LABELS.index(TAGS.get(token, "O"))] = 1.0
        classifier = model.weights["classifier.weight"]
        classifier.zero_()
        classifier[:, : len(LABELS)] = 20.0 * torch.eye(len(LABELS))
        model.weights["classifier.bias"].zero_()
    return model.save(tmp_path_factory.mktemp("tagger") / "model")


def _engine(path: Path, **kwargs: object) -> Iterator[InferenceEngine]:
    with InferenceEngine(path, backend="ort", threads=1, **kwargs) as engine:
        yield engine


@pytest.fixture(scope="session")
def encoder(encoder_dir: Path) -> Iterator[InferenceEngine]:
    """The packed ONNX Runtime engine of the tiny encoder (the server's default layout)."""
    yield from _engine(encoder_dir)


@pytest.fixture(scope="session")
def classifier(classifier_dir: Path) -> Iterator[InferenceEngine]:
    yield from _engine(classifier_dir)


@pytest.fixture(scope="session")
def tagger(tagger_dir: Path) -> Iterator[InferenceEngine]:
    yield from _engine(tagger_dir)


@pytest.fixture(scope="session")
def client_of() -> Callable[..., object]:
    """`with client_of(engine, **options) as client:` a test client of an app serving it."""
    from starlette.testclient import TestClient

    from bertrt.serve.http import ServeOptions, create_app

    def make(engine: InferenceEngine, **options: object) -> TestClient:
        return TestClient(create_app(engine, ServeOptions(**options)),
                          raise_server_exceptions=False)

    return make


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Texts the tiny models know the words of (an empty one included)."""
    return list(TEXTS)


@pytest.fixture(scope="session")
def max_length() -> int:
    return MAX_LENGTH
