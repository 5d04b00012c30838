"""`Model`: a config, its IR graph, its weights and its tokenizer — the unit users load and save.

The weights are a dict of torch tensors keyed by the graph's (Hugging Face) parameter names.
`to_torch()` wraps those very tensors as the module's parameters, so training the module trains
the model and `save()` writes the trained values. Moves keep that one set of tensors: `model.to`
moves the weights and every module lowered from them; a module's own `.to` writes what it moved
back into the weights (`bertrt.lower.to_torch`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bertrt.config import BertConfig
from bertrt.errors import BertrtError, ConfigError, WeightsError
from bertrt.graph.bert import ARCHITECTURES, build_bert, canonical_head
from bertrt.graph.ir import HEAD, Graph, Role
from bertrt.modeldir import Carried, read_carried, write_carried
from bertrt.weights import (
    SAFETENSORS,
    detect_head,
    match_tensors,
    read_tensors,
    write_safetensors,
)

if TYPE_CHECKING:
    from bertrt.lower.to_torch import LoweredModule
    from bertrt.tokenizer import Tokenizer


class Model:
    """A BERT model: `config`, `graph` (as built, unfused), `weights` and `tokenizer`.

    Build with `Model.from_config` (fresh, seeded) or `bertrt.load` (a Hugging Face-layout dir).
    """

    def __init__(
        self,
        config: BertConfig,
        head: str | None,
        weights: dict[str, torch.Tensor],
        tokenizer: Tokenizer | None = None,
        graph: Graph | None = None,
    ) -> None:
        self.config = config
        self.head = canonical_head(head)
        #: `graph` may be passed when the caller already built it for this config and head.
        self.graph: Graph = graph if graph is not None else build_bert(config, self.head)
        missing = [n for n in self.graph.params if n not in weights]
        if missing:
            raise WeightsError(f"no weights for parameter(s) {missing[:5]}")
        self.weights: dict[str, torch.Tensor] = {n: weights[n] for n in self.graph.params}
        self._tokenizer = None
        self.tokenizer = tokenizer
        #: Parameters that were initialised fresh at load time (absent from the checkpoint).
        self.fresh_params: list[str] = []
        #: The files of the dir it was loaded from that bertrt does not write (sentence-
        #: transformers configs, tokenizer.json, ...): `save` writes them too (`modeldir`).
        self.carried: Carried | None = None
        #: The live modules lowered from this model (`to_torch`), which `to` moves too.
        self._lowered: weakref.WeakSet[LoweredModule] = weakref.WeakSet()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_config(
        cls,
        config: BertConfig,
        head: str | None = None,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
    ) -> Model:
        """A freshly initialised model, as BERT initialises: normal(0, initializer_range) for
        matrices and embeddings, zero biases, LayerNorm 1/0, a zero `[PAD]` embedding row.
        The same seed gives the same weights."""
        graph = build_bert(config, canonical_head(head))
        weights = init_weights(graph, config, seed)
        return cls(config, head, weights, tokenizer, graph=graph)

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], head: str | None = None) -> Model:
        """Load a Hugging Face-layout model dir; see `bertrt.load`."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise WeightsError(f"{model_dir}: not a directory (expected a model dir with "
                               "config.json and model.safetensors)")
        config = BertConfig.from_pretrained(model_dir)
        tensors = read_tensors(model_dir)
        if head is None:
            head = detect_head(set(tensors), config.extra.get("architectures"))
        head = canonical_head(head)
        graph = build_bert(config, head)
        report = match_tensors(graph, tensors, str(model_dir))
        weights = dict(report.matched)
        encoder_missing = [n for n in report.missing
                           if graph.scope_of(graph.params[n]) != HEAD]
        if encoder_missing:
            shapes = ", ".join(f"{n} {list(graph.params[n].shape)}" for n in encoder_missing[:5])
            more = f" (and {len(encoder_missing) - 5} more)" if len(encoder_missing) > 5 else ""
            raise WeightsError(f"{model_dir}: missing tensor(s) {shapes}{more}")
        if report.missing:
            weights.update(init_weights(graph, config, seed=0, names=report.missing))
            warnings.warn(
                f"{model_dir}: the checkpoint has no weights for the {head} head; initialised "
                f"fresh: {', '.join(report.missing)}",
                stacklevel=2,
            )
        tokenizer = _load_tokenizer(model_dir)
        _check_vocab(tokenizer, config, f"{model_dir / 'vocab.txt'}")
        model = cls(config, head, weights, tokenizer, graph=graph)
        model.fresh_params = list(report.missing)
        model.carried = read_carried(model_dir, tokenizer)
        return model

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Tokenizer:
        """The model's WordPiece tokenizer (from `vocab.txt` or `tokenizer.json`)."""
        if self._tokenizer is None:
            raise BertrtError("this model has no tokenizer (its dir had neither vocab.txt nor "
                              "tokenizer.json); give one with Model(..., tokenizer=...)")
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer | None) -> None:
        _check_vocab(tokenizer, self.config, "tokenizer")
        self._tokenizer = tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def num_parameters(self) -> int:
        return sum(int(t.numel()) for t in self.weights.values())

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> Model:
        """Move the weights to `device` and their floating-point tensors to `dtype`, and the
        modules lowered from this model with them (they keep sharing one set of tensors);
        returns the model. A tensor already there stays the very same object (on the CPU,
        `model.to("cpu")` changes nothing); one that moves is a new tensor (a new Parameter
        once lowered), so build optimizers after moving, as for `nn.Module.to`. A module's
        own `.to()` also moves the weights, but not the other modules lowered from them."""
        with torch.no_grad():
            for name, tensor in self.weights.items():
                moved = tensor.to(device=device,
                                  dtype=dtype if tensor.is_floating_point() else None)
                if moved is tensor:
                    continue
                if isinstance(tensor, torch.nn.Parameter):
                    moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                self.weights[name] = moved
        for net in list(self._lowered):
            net.bind(self.weights)
        return self

    # ------------------------------------------------------------------ lowerings
    def to_torch(self, fuse: bool | str = True, checkpoint_layers: bool = False,
                 packed: bool = False) -> LoweredModule:
        """An `nn.Module` over this model's weights (shared storage, not a copy), in eval mode
        as `transformers` returns models (training code calls `.train()`).

        `forward(input_ids, attention_mask=None, token_type_ids=None, masked_positions=None)`
        returns a dict: `last_hidden_state`, `pooler_output`, and the head's logits.

        Args:
            fuse: A pipeline of `bertrt.graph.passes.PIPELINES` ("none", "torch", "all",
                "ort") applied to a copy of the graph (`model.graph` stays as built); True is
                the torch default ("torch"), False is "none".
            checkpoint_layers: Recompute each encoder layer's activations in the backward
                pass instead of keeping them (activation checkpointing).
            packed: Padding-free: the `torch-packed` pipeline (`fuse` is then ignored); the
                module takes `(input_ids, cu_seqlens, token_type_ids)` with the batch's
                tokens one after another (see `bertrt.lower.to_torch.PackedModule`).
        """
        from bertrt.graph.passes import fused_copy, pipeline
        from bertrt.lower.to_torch import lower

        passes = pipeline("torch-packed" if packed else fuse, "torch")
        graph, _ = fused_copy(self.graph, passes)
        masked = None
        if self.head == "pretraining":  # the MLM head on the masked rows only
            masked, _ = fused_copy(build_bert(self.config, self.head, masked_lm=True), passes)
        net = lower(graph, self.weights, checkpoint_layers=checkpoint_layers,
                    masked_graph=masked)
        self._lowered.add(net)
        return net.eval()

    def export_onnx(
        self,
        path: str | os.PathLike[str],
        flavour: str | None = None,
        fp16: bool = False,
        opset: int | None = None,
        head: str | None = None,
        fuse: bool = True,
        padding: str = "right",
        packed: bool = False,
        int8: bool = False,
    ) -> Path:
        """Write the model as ONNX for inference; see `bertrt.lower.to_onnx.export`.

        Args:
            path: The `.onnx` file to write (atomically: nothing is left on failure).
            flavour: "ort" (ONNX Runtime's com.microsoft fused ops) or "standard" (core ONNX);
                default "ort", or "standard" with `int8` (the int8 form of the ort flavour
                is not supported).
            fp16: fp16 weights and compute (LayerNorm and softmax accumulate accurately).
            opset: The ONNX opset (default: the lowering's).
            head: Export another head than the model's own ("none": encoder + pooler).
            fuse: A pipeline of `bertrt.graph.passes.PIPELINES` applied to a copy of the graph
                first; True is the flavour's default ("ort": every fusion, plus per-row
                lengths for attention when `padding="right"`; "standard": "all"), False is
                "none".
            padding: "right" (as the tokenizer pads; fastest ONNX Runtime attention) or
                "any" (left padding and masks with holes are exact too).
            packed: Padding-free: inputs `input_ids`, `token_type_ids` (tokens,) int64 and
                `cu_seqlens` (batch+1,) int32; per-token outputs (tokens, ...). The `packed`
                pipeline (`fuse` and `padding` are then ignored).
            int8: Dynamic int8 weight products for CPU (which ones: `bertrt.lower.int8`;
                the FFN down-projections are chosen by running the fp32 model on the first
                docstrings of the built-in corpus, when the model has a tokenizer); needs
                onnxruntime.
        """
        from bertrt.graph.passes import fused_copy
        from bertrt.lower.to_onnx import export

        if flavour is None:
            flavour = "standard" if int8 else "ort"
        graph, tensors = self.graph, self.weights
        if head is not None and canonical_head(head) != self.head:
            graph, tensors = _graph_for_head(self, canonical_head(head))
        passes = _export_passes(fuse, flavour, padding, packed)
        graph, _ = fused_copy(graph, passes)
        weights = {name: tensors[name].detach().to("cpu", torch.float32).numpy()
                   for name in graph.params}
        metadata: dict[str, Any] = {"config": self.config.to_dict()}
        if self.has_tokenizer:
            metadata["vocab"] = self.tokenizer.vocab
        calibration = None
        if int8 and self.has_tokenizer:
            from bertrt.lower.int8 import CALIBRATION_TEXTS
            from bertrt.train.corpus import docstring_texts

            limit = min(128, int(self.config.max_position_embeddings))
            enc = self.tokenizer(docstring_texts(CALIBRATION_TEXTS), max_length=limit,
                                 padding=False)
            calibration = [np.asarray(ids) for ids in enc["input_ids"]]
        return export(graph, weights, Path(path), flavour=flavour, fp16=fp16, opset=opset,
                      metadata=metadata, padding=padding, int8=int8, calibration=calibration)

    # ------------------------------------------------------------------ saving
    def save(self, model_dir: str | os.PathLike[str]) -> Path:
        """Write a Hugging Face-layout dir: config.json, model.safetensors, and the tokenizer's
        vocab.txt + tokenizer_config.json; and the files of the dir the model was loaded from
        that bertrt does not write (`carried`: sentence-transformers configs and modules,
        special-token maps, tokenizer.json while the vocabulary is the same; see
        `bertrt.modeldir`), so a sentence-transformers model stays one. Each file is written
        whole or not at all; saving into the dir the model came from keeps them."""
        model_dir = Path(model_dir)
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BertrtError(f"{model_dir}: cannot create directory ({exc.strerror})") from None
        # to_dict() writes id2label/label2id itself; only the class name depends on the head
        config = dataclasses.replace(
            self.config, extra={**self.config.extra, "architectures": [ARCHITECTURES[self.head]]})
        write_safetensors(self.weights, model_dir / SAFETENSORS)
        config.save(model_dir)
        if self._tokenizer is not None:
            self._tokenizer.save(model_dir)
        write_carried(self.carried, model_dir, self._tokenizer)
        return model_dir

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached tensors by Hugging Face name (tied decoder weights not repeated)."""
        return {k: v.detach() for k, v in self.weights.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy values into this model's weights in place (names mapped as at load time)."""
        report = match_tensors(self.graph, tensors, "state_dict")
        if report.missing:
            raise WeightsError(f"state_dict: missing tensor(s) {report.missing[:5]}")
        with torch.no_grad():
            for name, tensor in report.matched.items():
                self.weights[name].copy_(tensor)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model(head={self.head!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, vocab={c.vocab_size}, "
                f"params={self.num_parameters():,})")


def _export_passes(fuse: bool | str, flavour: str, padding: str,
                   packed: bool) -> tuple[str, ...]:
    """The passes an ONNX export runs: the packed pipeline, or `fuse`'s (True: the flavour's
    default, without the right-padding-only rewrites when `padding` is not "right")."""
    from bertrt.graph.passes import PIPELINES, REWRITES, pipeline

    if packed:
        return PIPELINES["packed"]
    passes = pipeline(fuse, "onnx-ort" if flavour == "ort" else "onnx-standard")
    if padding == "right":
        return passes
    if fuse is True:
        return tuple(p for p in passes if p not in REWRITES)
    if "mask_index" in passes:
        raise BertrtError("fuse: the mask_index pass assumes right padding; "
                          f"padding={padding!r} needs a pipeline without it ('all')")
    return passes


def _graph_for_head(model: Model, head: str) -> tuple[Graph, dict[str, torch.Tensor]]:
    """The graph of `model`'s encoder under another head, and its weights by graph name
    (mapped as at load time: the `bert.` prefix added or dropped, other heads' tensors unused)."""
    graph = build_bert(model.config, head)
    report = match_tensors(graph, model.weights, f"the {model.head} model")
    if report.missing:
        raise WeightsError(f"cannot export head {head!r}: the model has no weights for "
                           f"{report.missing[0]} (it holds the {model.head} head)")
    return graph, report.matched


def _check_vocab(tokenizer: Tokenizer | None, config: BertConfig, source: str) -> None:
    """More tokens than vocab_size is an error (fewer is legal: checkpoints pad the table)."""
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"{source}: {tokenizer.vocab_size} tokens, more than "
                          f"vocab_size={config.vocab_size} in config.json")


def init_weights(graph: Graph, config: BertConfig, seed: int,
                 names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Deterministic BERT initialisation of the graph's parameters, drawn in graph order from
    the seed; with `names`, only those are drawn (say, a head a checkpoint lacks), so a large
    table that is not wanted costs nothing."""
    gen = torch.Generator().manual_seed(int(seed))
    wanted = set(graph.params) if names is None else set(names)
    weights: dict[str, torch.Tensor] = {}
    for name, value in graph.params.items():
        if name not in wanted:
            continue
        kind, *args = value.init
        shape = tuple(int(d) for d in value.shape)
        if kind == "normal":
            std = float(args[0]) if args else config.initializer_range
            tensor = torch.empty(shape).normal_(0.0, std, generator=gen)
            if value.role is Role.WORD_EMBEDDINGS:
                tensor[config.pad_token_id] = 0.0  # as nn.Embedding(padding_idx=...) does
        elif kind == "ones":
            tensor = torch.ones(shape)
        elif kind == "zeros":
            tensor = torch.zeros(shape)
        else:
            raise ValueError(f"parameter {name}: unknown init {value.init}")
        weights[name] = tensor
    return weights


def _load_tokenizer(model_dir: Path) -> Tokenizer | None:
    from bertrt.tokenizer import Tokenizer

    if not (model_dir / "vocab.txt").is_file() and not (model_dir / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(model_dir)


def load(model_dir: str | os.PathLike[str], head: str | None = None) -> Model:
    """Load a Hugging Face-layout BERT dir (config.json + model.safetensors + vocab.txt).

    Args:
        model_dir: The directory. `pytorch_model.bin` is read (weights only) when no
            safetensors file is present; `tokenizer.json` serves when there is no vocab.txt.
        head: "none", "pretraining", "classification", "token-classification" or
            "question-answering"; by default the head the checkpoint holds (from its
            tensors, or `architectures`). A head the checkpoint lacks is initialised fresh,
            with a warning naming its parameters.
    """
    return Model.load(model_dir, head=head)
