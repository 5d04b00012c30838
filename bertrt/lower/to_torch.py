"""Lowering to PyTorch: a table from IR op to torch function, and a generated `forward`.

`lower(graph, weights)` returns a `LoweredModule` whose parameters are registered under the IR's
(Hugging Face) names and *are* the tensors in `weights` (shared storage, not copies). Its forward
is Python source generated from the graph once — one plain call per node, no interpretation per
call — so it costs what a hand-written module costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bertrt import kernels
from bertrt.errors import InputError
from bertrt.graph.ir import Graph, Node, Value, ValueKind

_MASK_MIN = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class TorchOp:
    """How one IR op runs in torch: `fn(*inputs, **attrs)`, plus `training=` when asked."""

    fn: Callable[..., Any]
    training: bool = False
    #: Same result written into the first input; used only outside autograd, and only when
    #: that input is an intermediate read by nobody after this node, of the output's type.
    inplace: Callable[..., Any] | None = None


def _position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device)


def _attention_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    # None means "attend everywhere": attention then runs without a mask (faster kernels)
    if mask is None:
        return None
    # (B, S) 1/0 -> (B, 1, 1, S) additive bias, as the reference implementation builds it
    keep = mask[:, None, None, :].to(torch.float32)
    return (1.0 - keep) * _MASK_MIN


def _add(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return a if b is None else a + b  # b is None only for an absent attention mask


def _add_(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return a if b is None else a.add_(b)


def _split_heads(x: torch.Tensor, *, heads: int) -> torch.Tensor:
    b, s, h = x.shape
    return x.view(b, s, heads, h // heads).transpose(1, 2)  # (B, S, H) -> (B, N, S, D)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, n, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, n * d)  # (B, N, S, D) -> (B, S, H)


def _matmul(a: torch.Tensor, b: torch.Tensor, *, transpose_b: bool) -> torch.Tensor:
    return torch.matmul(a, b.transpose(-1, -2) if transpose_b else b)


def _gather_rows(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return x
    return x.reshape(-1, x.shape[-1]).index_select(0, positions)  # (B*S, H) -> (M, H)


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *, eps: float):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _dropout(x: torch.Tensor, *, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training) if training and p > 0.0 else x


TORCH_OPS: dict[str, TorchOp] = {
    "GATHER": TorchOp(F.embedding),  # F.embedding(ids, table): arguments swapped in codegen
    "POSITION_IDS": TorchOp(_position_ids),
    "ADD": TorchOp(_add, inplace=_add_),
    "SCALE": TorchOp(lambda x, *, factor: x * factor),
    "LAYER_NORM": TorchOp(_layer_norm),
    "LINEAR": TorchOp(F.linear),
    "GELU": TorchOp(F.gelu),
    "RELU": TorchOp(F.relu),
    "SILU": TorchOp(F.silu),
    "TANH": TorchOp(torch.tanh),
    "DROPOUT": TorchOp(_dropout, training=True),
    "SOFTMAX": TorchOp(lambda x, *, axis: torch.softmax(x, axis)),
    "ATTENTION_MASK": TorchOp(_attention_mask),
    "SPLIT_HEADS": TorchOp(_split_heads),
    "MERGE_HEADS": TorchOp(_merge_heads),
    "MATMUL": TorchOp(_matmul),
    "SELECT_TOKEN": TorchOp(lambda x, *, index: x[:, index]),
    "GATHER_ROWS": TorchOp(_gather_rows),
    "EMBED_LAYER_NORM": TorchOp(kernels.embed_layer_norm, training=True),
    "SKIP_LAYER_NORM": TorchOp(kernels.skip_layer_norm, training=True),
    "BIAS_GELU": TorchOp(kernels.bias_gelu),
    "ATTENTION": TorchOp(kernels.attention, training=True),
}

#: Ops whose torch function takes its inputs in another order than the IR's.
_ARG_ORDER: dict[str, tuple[int, ...]] = {"GATHER": (1, 0)}


class LoweredModule(nn.Module):
    """A BERT graph as an `nn.Module`.

    `forward(input_ids, attention_mask=None, token_type_ids=None, masked_positions=None)`
    returns a dict of the graph's outputs. `masked_positions` (pretraining head only) is a
    (B, S) bool mask or 1-D int64 flat indices b*S+s; the MLM head then runs on those rows only
    and `prediction_logits` is (M, V). Without it, `prediction_logits` is (B, S, V).
    """

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        missing = [name for name in graph.params if name not in weights]
        if missing:
            raise KeyError(f"no weights for parameter(s) {missing[:5]}")
        params: list[nn.Parameter] = []
        for name in graph.params:
            tensor = weights[name]
            if not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor)  # wraps the same storage
                weights[name] = tensor
            self._register_dotted(name, tensor)
            params.append(tensor)
        self._param_list = tuple(params)
        self.graph_name = graph.name
        self.output_names = tuple(graph.outputs)
        self.input_names = tuple(v.name for v in graph.inputs)
        max_pos = [p.shape[0] for n, p in zip(graph.params, params)
                   if n.endswith("embeddings.position_embeddings.weight")]
        type_vocab = [p.shape[0] for n, p in zip(graph.params, params)
                      if n.endswith("embeddings.token_type_embeddings.weight")]
        vocab = [p.shape[0] for n, p in zip(graph.params, params)
                 if n.endswith("embeddings.word_embeddings.weight")]
        self.max_positions = max_pos[0] if max_pos else None
        self.type_vocab_size = type_vocab[0] if type_vocab else None
        self.vocab_size = vocab[0] if vocab else None
        #: Check token ids against the tables (costs a reduction per call; off for speed).
        self.check_inputs = True
        self.source, self._forward = generate_forward(graph)
        # Outside autograd, a second forward updates dead intermediates in place.
        self.inference_source, self._forward_inference = generate_forward(graph, inference=True)

    def _register_dotted(self, name: str, param: nn.Parameter) -> None:
        *path, leaf = name.split(".")
        module: nn.Module = self
        for part in path:
            child = module._modules.get(part)
            if child is None:
                child = nn.Module()
                module.add_module(part, child)
            module = child
        module.register_parameter(leaf, param)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        input_ids, attention_mask, token_type_ids, masked_positions = self._prepare(
            input_ids, attention_mask, token_type_ids, masked_positions
        )
        forward = self._forward if torch.is_grad_enabled() else self._forward_inference
        return forward(
            self._param_list, self.training, input_ids, attention_mask, token_type_ids,
            masked_positions,
        )

    def _prepare(self, input_ids, attention_mask, token_type_ids, masked_positions):
        device = self._param_list[0].device
        input_ids = _as_index(input_ids, "input_ids", device)
        if input_ids.dim() == 1:
            raise InputError("input_ids: expected shape (batch, seq), got a 1-D tensor; "
                             "add a batch dimension")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise InputError(f"input_ids: expected a non-empty (batch, seq) tensor, "
                             f"got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if self.max_positions is not None and seq > self.max_positions:
            raise InputError(f"input_ids: sequence length {seq} exceeds "
                             f"max_position_embeddings={self.max_positions}")
        if attention_mask is not None:
            attention_mask = _as_index(attention_mask, "attention_mask", device)
            _same_shape(attention_mask, input_ids, "attention_mask")
            if bool(attention_mask.all()):
                attention_mask = None  # nothing padded: the unmasked path is exact and faster
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            token_type_ids = _as_index(token_type_ids, "token_type_ids", device)
            _same_shape(token_type_ids, input_ids, "token_type_ids")
        if masked_positions is not None:
            if "masked_positions" not in self.input_names:
                raise InputError("masked_positions: only the pretraining head takes it")
            masked_positions = torch.as_tensor(masked_positions, device=device)
            if masked_positions.dtype == torch.bool:
                _same_shape(masked_positions, input_ids, "masked_positions")
                masked_positions = masked_positions.reshape(-1).nonzero().squeeze(1)
            elif masked_positions.dim() != 1 or masked_positions.is_floating_point():
                raise InputError("masked_positions: expected a (batch, seq) bool mask or 1-D "
                                 "int64 flat indices b*seq+s")
            masked_positions = masked_positions.long()
        if self.check_inputs:
            _check_range(input_ids, self.vocab_size, "input_ids", "vocab_size")
            _check_range(token_type_ids, self.type_vocab_size, "token_type_ids",
                         "type_vocab_size")
            if masked_positions is not None:
                _check_range(masked_positions, batch * seq, "masked_positions", "batch*seq")
        return input_ids, attention_mask, token_type_ids, masked_positions

    def extra_repr(self) -> str:
        return f"graph={self.graph_name!r}, outputs={list(self.output_names)}"


def _as_index(x: Any, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.is_floating_point() or t.is_complex():
        raise InputError(f"{name}: expected integer ids, got dtype {t.dtype}")
    return t.long() if t.dtype != torch.long else t


def _same_shape(x: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if x.shape != ref.shape:
        raise InputError(f"{name}: shape {tuple(x.shape)} differs from input_ids "
                         f"{tuple(ref.shape)}")


def _check_range(x: torch.Tensor, limit: int | None, name: str, field: str) -> None:
    if limit is None or x.numel() == 0:
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name}: id {bad} is out of range [0, {field}={limit})")


def _literal(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)


def generate_forward(
    graph: Graph, inference: bool = False
) -> tuple[str, Callable[..., dict[str, torch.Tensor]]]:
    """Python source of the graph's forward, and the compiled function.

    The function takes (params, training, input_ids, attention_mask, token_type_ids,
    masked_positions); graph inputs are bound by name. With `inference`, ops that have an
    in-place variant write into an input that dies at that node (valid only without autograd).
    """
    names: dict[int, str] = {}
    env: dict[str, Any] = {}
    lines = ["def forward(params, training, input_ids, attention_mask, token_type_ids, "
             "masked_positions):"]
    param_vars = []
    for i, value in enumerate(graph.params.values()):
        names[id(value)] = f"p{i}"
        param_vars.append(f"p{i}")
    if param_vars:
        lines.append(f"    ({', '.join(param_vars)},) = params")
    for value in graph.inputs:
        names[id(value)] = value.name
    # Free each intermediate right after its last reader, as a hand-written forward would:
    # holding every activation to the end makes each allocation fresh memory (page faults).
    keep = {id(v) for v in graph.outputs.values()}
    last_use: dict[int, int] = {}
    for j, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None and v.kind is ValueKind.NODE and id(v) not in keep:
                last_use[id(v)] = j
    dead_after: dict[int, list[str]] = {}
    for j, node in enumerate(graph.nodes):
        entry = TORCH_OPS.get(node.op)
        if entry is None:
            raise NotImplementedError(f"no torch lowering for op {node.op}")
        fn_name, fn = node.op, entry.fn
        inputs = list(node.inputs)
        if inference and entry.inplace is not None:
            target = _inplace_target(node, last_use, j)
            if target is not None:
                fn_name, fn = f"{node.op}_", entry.inplace
                inputs.insert(0, inputs.pop(target))  # in-place ops here are commutative
        env[fn_name] = fn
        args = [names[id(v)] if v is not None else "None" for v in inputs]
        order = _ARG_ORDER.get(node.op)
        if order is not None:
            args = [args[k] for k in order]
        kwargs = [f"{k}={_literal(v)}" for k, v in node.attrs.items()]
        if entry.training:
            kwargs.append("training=training")
        out = f"v{j}"
        names[id(node.output)] = out
        lines.append(f"    {out} = {fn_name}({', '.join(args + kwargs)})  # {node.name}")
        for v in node.inputs:
            if v is not None and last_use.get(id(v)) == j:
                dead_after.setdefault(j, []).append(names[id(v)])
        if j in dead_after:
            lines.append(f"    del {', '.join(sorted(set(dead_after[j])))}")
    outputs = ", ".join(f"{key!r}: {names[id(v)]}" for key, v in graph.outputs.items())
    lines.append(f"    return {{{outputs}}}")
    source = "\n".join(lines) + "\n"
    code = compile(source, f"<bertrt forward: {graph.name}>", "exec")
    exec(code, env)  # generated code only, built from the registry's names above
    return source, env["forward"]


#: Ops whose torch function may return its first input or a view of it.
_ALIASING = frozenset({"DROPOUT", "SELECT_TOKEN", "SPLIT_HEADS", "MERGE_HEADS", "GATHER_ROWS"})


def _inplace_target(node: Node, last_use: dict[int, int], index: int) -> int | None:
    """Which input (0 or 1) a commutative in-place op may overwrite, if any: one that dies at
    this node, has the output's type, and aliases no value that is still live (or is an
    input, parameter or graph output, none of which are in `last_use`)."""
    for i in (0, 1):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None or last_use.get(id(v)) != index or v.type != node.output.type:
            continue
        if _owns_storage(v, last_use, index):
            return i
    return None


def _owns_storage(v: Value, last_use: dict[int, int], index: int) -> bool:
    """True if `v`'s storage belongs to intermediates that are all dead after `index`."""
    while True:
        if v.kind is not ValueKind.NODE or last_use.get(id(v), index + 1) > index:
            return False
        assert v.producer is not None
        if v.producer.op not in _ALIASING:
            return True
        source = v.producer.inputs[0]
        if source is None:
            return False
        v = source


def lower(graph: Graph, weights: Mapping[str, torch.Tensor]) -> LoweredModule:
    """Lower `graph` to an `nn.Module` over `weights` (a dict updated in place to Parameters)."""
    unknown = [v.name for v in graph.values() if v.kind is ValueKind.INPUT and v.name not in (
        "input_ids", "attention_mask", "token_type_ids", "masked_positions")]
    if unknown:
        raise NotImplementedError(f"graph inputs {unknown} are not supported by the torch forward")
    return LoweredModule(graph, weights)  # type: ignore[arg-type]
