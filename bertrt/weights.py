"""Reading and writing BERT weights in the Hugging Face model-dir layout.

Safetensors only for writing; reading takes `model.safetensors`, a sharded
`model.safetensors.index.json`, or — when nothing else is there — `pytorch_model.bin` through
`torch.load(weights_only=True)`, which never unpickles code. Names are mapped onto the graph's:
the `bert.` prefix added or removed, tied decoder weights dropped, buffers such as
`embeddings.position_ids` ignored, TF-era `gamma`/`beta` LayerNorm names renamed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bertrt.errors import WeightsError
from bertrt.fileio import atomic_path
from bertrt.graph.ir import Graph

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"

#: Checkpoint tensors that are aliases of graph parameters (tied weights).
TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
#: Tensors that are buffers or bookkeeping, not parameters.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
#: Prefixes of tensors that belong to a head; dropping them when another head is asked is fine.
HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors stored in `model_dir`, by their stored names."""
    single = model_dir / SAFETENSORS
    index = model_dir / SAFETENSORS_INDEX
    legacy = model_dir / PYTORCH_BIN
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise WeightsError(f"{index}: not a safetensors index ({exc})") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(model_dir / shard))
        return tensors
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure is a bad file for the user
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{legacy}: cannot read as a weights-only checkpoint "
                               f"({first})") from None
        if not isinstance(state, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise WeightsError(f"{legacy}: expected a mapping of names to tensors")
        return dict(state)
    raise WeightsError(
        f"{model_dir}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX} or "
        f"{PYTORCH_BIN})"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: not a readable safetensors file ({first}); "
                           "is it truncated?") from None


def detect_head(names: set[str], architectures: list[str] | None) -> str:
    """The head a checkpoint holds, from its tensor names and `architectures`."""
    arch = (architectures or [""])[0]
    if arch == "BertForTokenClassification":
        return "token-classification"
    if arch == "BertForSequenceClassification":
        return "classification"
    if arch == "BertForPreTraining":
        return "pretraining"
    if arch == "BertForQuestionAnswering" or "qa_outputs.weight" in names:
        return "question-answering"
    if any(n.startswith("cls.predictions.") for n in names) and any(
        n.startswith("cls.seq_relationship.") for n in names
    ):
        return "pretraining"
    if "classifier.weight" in names:
        # the reference tagger has no pooler; a sequence classifier always has one
        has_pooler = any(n.endswith("pooler.dense.weight") for n in names)
        return "classification" if has_pooler else "token-classification"
    return "none"


@dataclass
class MatchReport:
    """How checkpoint tensors were matched to graph parameters."""

    matched: dict[str, torch.Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # graph params with no tensor
    unused: list[str] = field(default_factory=list)  # tensors of another head, dropped


def match_tensors(graph: Graph, tensors: Mapping[str, torch.Tensor], source: str) -> MatchReport:
    """Map stored names onto the graph's parameter names; check shapes.

    Raises `WeightsError` for tensors that fit nowhere or have the wrong shape; returns the
    parameters the checkpoint lacks in `missing` (the caller decides whether that is fatal).
    """
    encoder_prefix = "bert." if any(n.startswith("bert.") for n in graph.params) else ""
    renamed: dict[str, torch.Tensor] = {}
    report = MatchReport()
    unexpected: list[str] = []
    for stored, tensor in tensors.items():
        name = stored
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        if name.startswith("bert."):
            name = name[len("bert."):] if not encoder_prefix else name
        elif encoder_prefix and not name.startswith(HEAD_PREFIXES):
            name = encoder_prefix + name
        if name in TIED:
            continue  # the graph reads the tensor it is tied to
        if name not in graph.params:
            if name.startswith(HEAD_PREFIXES) or "pooler." in name:
                report.unused.append(stored)
            else:
                unexpected.append(f"{stored} {list(tensor.shape)}")
            continue
        renamed[name] = tensor
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" …" if len(unexpected) > 5 else "")
        raise WeightsError(f"{source}: unexpected tensor(s) for this config: {shown}")
    if "cls.predictions.bias" in graph.params and "cls.predictions.bias" not in renamed:
        for stored in ("cls.predictions.decoder.bias", "bert.cls.predictions.decoder.bias"):
            if stored in tensors:
                renamed["cls.predictions.bias"] = tensors[stored]
    for name, value in graph.params.items():
        tensor = renamed.get(name)
        if tensor is None:
            report.missing.append(name)
            continue
        if tuple(tensor.shape) != tuple(value.shape):
            raise WeightsError(
                f"{source}: tensor {name} has shape {list(tensor.shape)}, expected "
                f"{list(value.shape)} from config.json"
            )
        if not tensor.is_floating_point():
            raise WeightsError(f"{source}: tensor {name} has dtype {tensor.dtype}, expected float")
        report.matched[name] = tensor.to(torch.float32).contiguous()
    return report


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (temporary file, then rename)."""
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={"format": "pt", **(metadata or {})})
