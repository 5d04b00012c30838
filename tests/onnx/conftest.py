"""Fixtures for the ONNX lowering: models (real MiniLM and small random ones with perturbed
weights), a cached exporter, ONNX Runtime sessions on the CPU EP, and right-padded batches.

Every model file is written once per session and shared by the tests that read it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import bertrt

LABELS = ["neg", "neu", "pos"]


def perturb_(model: bertrt.Model, seed: int) -> bertrt.Model:
    """Edit `model.weights` in place so no parameter keeps its initial value: LayerNorm
    weights scaled by 1 + noise, biases set to noise, matrices scaled up (sharper attention).
    The tied decoder is the word table itself, so it is edited once."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.weights.items():
            noise = torch.randn(t.shape, generator=gen)
            if "LayerNorm" in name and name.endswith("weight"):
                t.mul_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                t.copy_(0.2 * noise)
            else:
                t.mul_(5.0)
    return model


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path) -> bertrt.Model:
    return bertrt.load(minilm_dir)


@pytest.fixture(scope="session")
def random_model(random_configs: dict[str, dict[str, Any]]) -> Callable[[str, str], bertrt.Model]:
    """`random_model(config_name, head)`: a seeded model with perturbed weights (cached)."""
    cache: dict[tuple[str, str], bertrt.Model] = {}

    def make(config: str, head: str) -> bertrt.Model:
        if (config, head) not in cache:
            cfg = bertrt.BertConfig(**random_configs[config]).with_labels(LABELS)
            model = bertrt.Model.from_config(cfg, head=head, seed=len(cache))
            cache[(config, head)] = perturb_(model, seed=len(cache))
        return cache[(config, head)]

    return make


@pytest.fixture(scope="session")
def export(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`export(model, flavour="ort", fuse=True, fp16=False, opset=None)`: the model's ONNX
    file, written once per argument set."""
    folder = tmp_path_factory.mktemp("onnx")
    cache: dict[tuple[Any, ...], Path] = {}

    def run(model: bertrt.Model, flavour: str = "ort", fuse: bool = True, fp16: bool = False,
            opset: int | None = None) -> Path:
        key = (id(model), flavour, fuse, fp16, opset)
        if key not in cache:
            path = folder / f"m{len(cache)}-{flavour}-{'fused' if fuse else 'unfused'}.onnx"
            cache[key] = model.export_onnx(path, flavour=flavour, fuse=fuse, fp16=fp16,
                                           opset=opset)
        return cache[key]

    return run


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def ort_session() -> Callable[[Path], ort.InferenceSession]:
    return session


def make_batch(vocab: int, type_vocab: int, lengths: list[int], seq: int,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded int64 ids/mask/types. Padded positions hold random ids on purpose: a
    lowering that ignored the mask would then disagree with the reference."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, vocab, (len(lengths), seq), dtype=np.int64),
        "attention_mask": (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(
            np.int64),
        "token_type_ids": rng.integers(0, type_vocab, (len(lengths), seq), dtype=np.int64),
    }


def cases(max_pos: int) -> dict[str, tuple[list[int], int]]:
    """Name -> (lengths, seq): a ragged right-padded batch, batch 1 x seq 1, the longest seq."""
    s = max(5, max_pos // 2 + 1)
    return {
        "padded": ([s, s - 3, 1, s // 2], s),
        "b1s1": ([1], 1),
        "full": ([max_pos, max_pos // 3], max_pos),
    }


@pytest.fixture(scope="session")
def reference() -> Callable[[bertrt.Model], dict[str, tuple[dict, dict]]]:
    """`reference(model)`: case name -> (batch, the torch lowering's fp32 outputs on it),
    computed once per model."""
    cache: dict[int, dict[str, tuple[dict, dict]]] = {}

    def run(model: bertrt.Model) -> dict[str, tuple[dict, dict]]:
        if id(model) not in cache:
            c = model.config
            net = model.to_torch().eval()
            out = {}
            for i, (name, (lengths, seq)) in enumerate(cases(c.max_position_embeddings).items()):
                batch = make_batch(c.vocab_size, c.type_vocab_size, lengths, seq, seed=i)
                with torch.no_grad():
                    ref = net(**{k: torch.from_numpy(v) for k, v in batch.items()})
                out[name] = (batch, {k: v.numpy() for k, v in ref.items()})
            cache[id(model)] = out
        return cache[id(model)]

    return run
