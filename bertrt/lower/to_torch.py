"""Lowering to PyTorch: a table from IR op to torch function, and a generated `forward`.

`lower(graph, weights)` returns a `LoweredModule` whose parameters are registered under the IR's
(Hugging Face) names and *are* the tensors in `weights` (shared storage, not copies). Its forward
is Python source generated from the graph once — one plain call per node, no interpretation per
call — so it costs what a hand-written module costs.

One set of tensors, whatever moves them: the generated forward reads the module's parameters at
call time (not a tuple captured at build time), and a move of the module (`.to`, `.cuda`,
`.double`, `.to_empty`: everything that goes through `nn.Module._apply`, which may create new
Parameter objects across device types) writes the moved parameters back into `weights`. So
`model.to_torch().to("cuda")` trains the tensors the `Model` saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from bertrt import kernels
from bertrt.errors import InputError
from bertrt.graph.ir import Graph, Node, Role, Value, ValueKind
from bertrt.graph.ops import Op, check_table
from bertrt.kernels.attention import token_positions


@dataclass(frozen=True)
class TorchOp:
    """How one IR op runs in torch: `fn(*inputs, **attrs)`, plus `training=` when asked."""

    fn: Callable[..., Any]
    training: bool = False
    #: Same result written into the first input; used only outside autograd, and only when
    #: that input is an intermediate read by nobody after this node, of the output's type.
    inplace: Callable[..., Any] | None = None
    #: `fn` may return its first input or a view of it (so writing into the result would
    #: write into that input).
    aliases: bool = False


def _gather(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return F.embedding(indices, table)


def _position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device)


def _softmax(x: torch.Tensor, key_mask: torch.Tensor | None = None, *, axis: int):
    # an absent mask (None) attends everywhere; a mask adds float32 min at masked keys
    if key_mask is not None:
        x = x + kernels.key_mask_bias(key_mask, x.shape[-1])
    return torch.softmax(x, axis)


class CuSeqlens(NamedTuple):
    """`cu_seqlens` as `PackedModule` hands it to the generated forward: the (B+1,) int32
    offsets on the model's device, and the longest sequence, known on the host so that no op
    has to ask the device for it (a host sync per layer on CUDA)."""

    offsets: torch.Tensor
    max_len: int


def _offsets(cu: torch.Tensor | CuSeqlens) -> tuple[torch.Tensor, int | None]:
    """The offsets tensor and the longest length if known (the ops take a bare tensor too)."""
    return (cu.offsets, cu.max_len) if isinstance(cu, CuSeqlens) else (cu, None)


def _packed_positions(cu_seqlens: torch.Tensor | CuSeqlens,
                      input_ids: torch.Tensor) -> torch.Tensor:
    offsets, _ = _offsets(cu_seqlens)
    # (B+1,) -> (T,) positions 0.. in each sequence; T from the ids' shape (no device read)
    return token_positions(offsets, total=input_ids.shape[0])[1]


def _first_tokens(x: torch.Tensor, cu_seqlens: torch.Tensor | CuSeqlens) -> torch.Tensor:
    offsets, _ = _offsets(cu_seqlens)
    return x.index_select(0, offsets[:-1].long())  # (T, H) -> (B, H)


def _packed_attention(x: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor,
                      k_weight: torch.Tensor, k_bias: torch.Tensor, v_weight: torch.Tensor,
                      v_bias: torch.Tensor, cu_seqlens: torch.Tensor | CuSeqlens,
                      **attrs: Any) -> torch.Tensor:
    offsets, max_len = _offsets(cu_seqlens)
    return kernels.packed_attention(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                                    offsets, max_seqlen=max_len, **attrs)


def _mask_index(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.sum(1, dtype=torch.int32)  # (B, S) -> (B,)


def _split_heads(x: torch.Tensor, *, heads: int) -> torch.Tensor:
    b, s, h = x.shape
    return x.view(b, s, heads, h // heads).transpose(1, 2)  # (B, S, H) -> (B, N, S, D)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, n, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, n * d)  # (B, N, S, D) -> (B, S, H)


def _matmul(a: torch.Tensor, b: torch.Tensor, *, transpose_b: bool) -> torch.Tensor:
    return torch.matmul(a, b.transpose(-1, -2) if transpose_b else b)


def _gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).index_select(0, positions)  # (B*S, H) -> (M, H)


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *, eps: float):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _dropout(x: torch.Tensor, *, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training) if training and p > 0.0 else x


TORCH_OPS: dict[Op, TorchOp] = {
    Op.GATHER: TorchOp(_gather),
    Op.POSITION_IDS: TorchOp(_position_ids),
    Op.ADD: TorchOp(torch.add, inplace=torch.Tensor.add_),
    Op.SCALE: TorchOp(lambda x, *, factor: x * factor),
    Op.LAYER_NORM: TorchOp(_layer_norm),
    Op.LINEAR: TorchOp(F.linear),
    Op.GELU: TorchOp(F.gelu),
    Op.RELU: TorchOp(F.relu),
    Op.SILU: TorchOp(F.silu),
    Op.TANH: TorchOp(torch.tanh),
    Op.DROPOUT: TorchOp(_dropout, training=True, aliases=True),
    Op.SOFTMAX: TorchOp(_softmax),
    Op.MASK_INDEX: TorchOp(_mask_index),
    Op.SPLIT_HEADS: TorchOp(_split_heads, aliases=True),
    Op.MERGE_HEADS: TorchOp(_merge_heads, aliases=True),
    Op.MATMUL: TorchOp(_matmul),
    Op.SELECT_TOKEN: TorchOp(lambda x, *, index: x[:, index], aliases=True),
    Op.SELECT_LAST: TorchOp(lambda x, *, index: x[..., index], aliases=True),
    Op.GATHER_ROWS: TorchOp(_gather_rows),
    Op.EMBED_LAYER_NORM: TorchOp(kernels.embed_layer_norm, training=True),
    Op.SKIP_LAYER_NORM: TorchOp(kernels.skip_layer_norm, training=True),
    Op.BIAS_GELU: TorchOp(kernels.bias_gelu),
    Op.ATTENTION: TorchOp(kernels.attention, training=True),
    Op.PACKED_POSITIONS: TorchOp(_packed_positions),
    Op.FIRST_TOKENS: TorchOp(_first_tokens),
    Op.PACKED_ATTENTION: TorchOp(_packed_attention, training=True),
}
check_table(TORCH_OPS, "torch")

#: The forward's argument for each input role (the order of `LoweredModule.forward`).
INPUT_ARGS = (Role.INPUT_IDS, Role.ATTENTION_MASK, Role.TOKEN_TYPE_IDS, Role.MASKED_POSITIONS,
              Role.CU_SEQLENS)

class LoweredModule(nn.Module):
    """A BERT graph as an `nn.Module`.

    `forward(input_ids, attention_mask=None, token_type_ids=None, masked_positions=None)`
    returns a dict of the graph's outputs. `masked_positions` (pretraining head only) is a
    (B, S) bool mask or 1-D int64 flat indices b*S+s; the masked-MLM form of the graph then
    runs, with the MLM head on those rows only, and `prediction_logits` is (M, V). Without it,
    `prediction_logits` is (B, S, V).
    """

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor],
                 checkpoint_layers: bool = False, masked_graph: Graph | None = None) -> None:
        super().__init__()
        missing = [name for name in graph.params if name not in weights]
        if missing:
            raise KeyError(f"no weights for parameter(s) {missing[:5]}")
        if masked_graph is not None and list(masked_graph.params) != list(graph.params):
            raise ValueError("masked_graph: its parameters differ from the graph's")
        #: The dict the module's parameters were taken from (a `Model`'s `weights`): moves of
        #: the module write the moved parameters back into it (`_apply`).
        self._weights = weights
        self._names = tuple(graph.params)
        for name in self._names:
            self._register_dotted(name, self._as_parameter(name))
        # Where each parameter lives, in graph order: (its owner's `_parameters`, its leaf
        # name). The forward reads them at call time, so a replaced Parameter is seen.
        self._slots = tuple(self._slot(name) for name in self._names)
        self.graph_name = graph.name
        self.output_names = tuple(graph.outputs)
        self.input_names = tuple(v.name for v in graph.inputs)

        def rows(role: Role) -> int | None:  # the size of an embedding table, for input checks
            table = graph.by_role(role)
            return int(table.shape[0]) if table is not None else None  # type: ignore[arg-type]

        self.max_positions = rows(Role.POSITION_EMBEDDINGS)
        self.type_vocab_size = rows(Role.TOKEN_TYPE_EMBEDDINGS)
        self.vocab_size = rows(Role.WORD_EMBEDDINGS)
        #: Check token ids against the tables (costs a reduction per call; off for speed).
        self.check_inputs = True
        self.source, self._forward = generate_forward(graph,
                                                      checkpoint_layers=checkpoint_layers)
        # Outside autograd, a second forward updates dead intermediates in place.
        self.inference_source, self._forward_inference = generate_forward(graph, inference=True)
        self.takes_masked_positions = masked_graph is not None
        if masked_graph is not None:
            _, self._forward_masked = generate_forward(masked_graph,
                                                       checkpoint_layers=checkpoint_layers)
            _, self._forward_masked_inference = generate_forward(masked_graph, inference=True)

    def _as_parameter(self, name: str) -> nn.Parameter:
        tensor = self._weights[name]
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor)  # wraps the same storage
            self._weights[name] = tensor
        return tensor

    def _slot(self, name: str) -> tuple[dict[str, Any], str]:
        *path, leaf = name.split(".")
        module: nn.Module = self
        for part in path:
            module = module._modules[part]  # type: ignore[assignment]
        return module._parameters, leaf

    def params(self) -> tuple[torch.Tensor, ...]:
        """The parameters in graph order, as the generated forward takes them (cheap: one
        dict lookup each)."""
        return tuple(owner[leaf] for owner, leaf in self._slots)  # type: ignore[misc]

    @property
    def device(self) -> torch.device:
        """The device of the parameters (inputs are moved there)."""
        owner, leaf = self._slots[0]
        return owner[leaf].device  # type: ignore[union-attr]

    def bind(self, weights: dict[str, torch.Tensor]) -> None:
        """Make `weights` (by parameter name) this module's parameters, as `lower` does: what
        `Model.to` calls on the modules lowered from it after moving their tensors."""
        self._weights = weights
        for name, (owner, leaf) in zip(self._names, self._slots):
            owner[leaf] = self._as_parameter(name)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> LoweredModule:
        # `nn.Module._apply` moves each parameter in place (`param.data = ...`) when the old
        # and new tensors are of compatible types (a dtype move on one device), but registers
        # a new Parameter across device types (CPU -> CUDA, meta) or when torch.__future__ asks
        # it to overwrite or swap: write whatever it left back into the shared weights.
        super()._apply(fn, recurse)
        for name, (owner, leaf) in zip(self._names, self._slots):
            self._weights[name] = owner[leaf]  # type: ignore[assignment]
        return self

    def _register_dotted(self, name: str, param: nn.Parameter) -> None:
        # Submodules follow the Hugging Face names, so `named_parameters()` and `state_dict()`
        # keys are the reference's (the names are only split, never interpreted).
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
        return self._generated(masked_positions is not None)(
            self.params(), self.training, input_ids, attention_mask, token_type_ids,
            masked_positions, None,
        )

    def _generated(self, masked: bool) -> Callable[..., dict[str, torch.Tensor]]:
        """The generated forward for this call: masked-MLM form or not, autograd or not."""
        grad = torch.is_grad_enabled()
        if masked:
            return self._forward_masked if grad else self._forward_masked_inference
        return self._forward if grad else self._forward_inference

    def _prepare(self, input_ids, attention_mask, token_type_ids, masked_positions):
        device = self.device
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
            attention_mask = _as_index(attention_mask, "attention_mask", None)  # where it is
            _same_shape(attention_mask, input_ids, "attention_mask")
            # Nothing padded: the unmasked path is exact and faster. Asked of a host mask only:
            # of a device mask it would cost a host sync, and the masked path is exact too.
            if attention_mask.device.type == "cpu" and bool(attention_mask.all()):
                attention_mask = None
            else:
                attention_mask = attention_mask.to(device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            token_type_ids = _as_index(token_type_ids, "token_type_ids", device)
            _same_shape(token_type_ids, input_ids, "token_type_ids")
        if masked_positions is not None:
            if not self.takes_masked_positions:
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


def _checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` under activation checkpointing when autograd records (RNG state preserved, so
    dropout recomputes alike), plainly otherwise."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _segments(graph: Graph) -> list[tuple[int | None, list[Node]]]:
    """Consecutive nodes grouped by encoder layer, by scope (None: outside any layer)."""
    segments: list[tuple[int | None, list[Node]]] = []
    for node in graph.nodes:
        scope = node.scope
        layer = scope.index if scope is not None and scope.kind == "layer" else None
        if segments and layer is not None and segments[-1][0] == layer:
            segments[-1][1].append(node)
        else:
            segments.append((layer, [node]))
    return segments


class _Emitter:
    """Writes straight-line Python for a list of nodes, one call per node, freeing each
    intermediate after its last reader (holding every activation to the end would make each
    allocation fresh memory, i.e. page faults)."""

    def __init__(self, graph: Graph, env: dict[str, Any], inference: bool) -> None:
        self.env = env
        self.inference = inference
        self.index = {id(n): i for i, n in enumerate(graph.nodes)}

    def body(self, nodes: list[Node], names: dict[int, str], live_out: set[int],
             indent: str = "    ") -> list[str]:
        last_use: dict[int, int] = {}
        for j, node in enumerate(nodes):
            for v in node.inputs:
                if v is not None and v.kind is ValueKind.NODE and id(v) not in live_out:
                    last_use[id(v)] = j
        lines = []
        for j, node in enumerate(nodes):
            lines.append(indent + self.call(node, names, last_use, j))
            dead = sorted({names[id(v)] for v in node.inputs
                           if v is not None and last_use.get(id(v)) == j and id(v) in names})
            if dead:
                lines.append(f"{indent}del {', '.join(dead)}")
        return lines

    def call(self, node: Node, names: dict[int, str], last_use: dict[int, int], j: int) -> str:
        entry = TORCH_OPS.get(node.op)
        if entry is None:
            raise NotImplementedError(f"no torch lowering for op {node.op}")
        fn_name, fn = node.op, entry.fn
        inputs = list(node.inputs)
        if self.inference and entry.inplace is not None:
            target = _inplace_target(node, last_use, j)
            if target is not None:
                fn_name, fn = f"{node.op}_", entry.inplace
                inputs.insert(0, inputs.pop(target))  # in-place ops here are commutative
        self.env[fn_name] = fn
        args = [names[id(v)] if v is not None else "None" for v in inputs]
        kwargs = [f"{k}={_literal(v)}" for k, v in node.attrs.items()]
        if entry.training:
            kwargs.append("training=training")
        out = f"v{self.index[id(node)]}"
        names[id(node.output)] = out
        return f"{out} = {fn_name}({', '.join(args + kwargs)})  # {node.name}"


def generate_forward(
    graph: Graph, inference: bool = False, checkpoint_layers: bool = False
) -> tuple[str, Callable[..., dict[str, torch.Tensor]]]:
    """Python source of the graph's forward, and the compiled function.

    The function takes (params, training, input_ids, attention_mask, token_type_ids,
    masked_positions); graph inputs are bound by role (`INPUT_ARGS`).

    Args:
        graph: The graph to lower.
        inference: Ops that have an in-place variant write into an input that dies at that
            node (valid only without autograd).
        checkpoint_layers: Emit each encoder layer as its own function, run under activation
            checkpointing while autograd records (memory traded for recomputation).
    """
    env: dict[str, Any] = {"CHECKPOINT": _checkpoint}
    emit = _Emitter(graph, env, inference)
    param_index = {id(v): i for i, v in enumerate(graph.params.values())}
    names: dict[int, str] = {key: f"p{i}" for key, i in param_index.items()}
    names.update({id(v): str(v.role) for v in graph.inputs})
    keep = {id(v) for v in graph.outputs.values()}
    segments = _segments(graph) if checkpoint_layers else [(None, list(graph.nodes))]
    # values each segment reads from outside it, and values read after it
    reads_after: list[set[int]] = []
    later: set[int] = set(keep)
    for _, nodes in reversed(segments):
        reads_after.append(set(later))
        later |= {id(v) for n in nodes for v in n.inputs if v is not None}
    reads_after.reverse()

    functions: list[str] = []
    main: list[str] = []
    if graph.params:
        main.append(f"    ({', '.join(f'p{i}' for i in range(len(graph.params)))},) = params")
    for (layer, nodes), after in zip(segments, reads_after):
        if layer is None:
            main += emit.body(nodes, names, live_out=after)
            continue
        produced = {id(n.output) for n in nodes}
        needed = list(dict.fromkeys(
            v for n in nodes for v in n.inputs
            if v is not None and id(v) not in produced and v.kind is not ValueKind.PARAM))
        outs = [n.output for n in nodes if id(n.output) in after]
        local = {k: v for k, v in names.items() if k in param_index}
        local.update({id(v): names[id(v)] for v in needed})
        fn = f"layer_{layer}"
        functions.append(f"def {fn}(params, training, {', '.join(local[id(v)] for v in needed)}):")
        used = sorted({param_index[id(v)] for n in nodes for v in n.inputs
                       if v is not None and id(v) in param_index})
        functions += [f"    p{i} = params[{i}]" for i in used]
        functions += emit.body(nodes, local, live_out={id(v) for v in outs})
        functions.append(f"    return ({''.join(local[id(v)] + ', ' for v in outs)})")
        functions.append("")
        for v in outs:
            names[id(v)] = local[id(v)]
        args = ", ".join(names[id(v)] for v in needed)
        main.append(f"    ({''.join(names[id(v)] + ', ' for v in outs)}) = "
                    f"CHECKPOINT({fn}, params, training, {args})")
        dead = sorted({names[id(v)] for v in needed
                       if v.kind is ValueKind.NODE and id(v) not in after})
        if dead:
            main.append(f"    del {', '.join(dead)}")
    outputs = ", ".join(f"{key!r}: {names[id(v)]}" for key, v in graph.outputs.items())
    main.append(f"    return {{{outputs}}}")
    header = f"def forward(params, training, {', '.join(map(str, INPUT_ARGS))}):"
    source = "\n".join(functions + [header] + main) + "\n"
    code = compile(source, f"<bertrt forward: {graph.name}>", "exec")
    exec(code, env)  # generated code only, built from the registry's names above
    return source, env["forward"]


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
        if not TORCH_OPS[v.producer.op].aliases:
            return True
        source = v.producer.inputs[0]
        if source is None:
            return False
        v = source


class PackedModule(LoweredModule):
    """A packed (padding-free) BERT graph as an `nn.Module` (see `bertrt.graph.passes.pack`).

    `forward(input_ids, cu_seqlens, token_type_ids=None, masked_positions=None)`: `input_ids`
    and `token_type_ids` (T,) hold the batch's sequences one after another, `cu_seqlens`
    (B+1,) their cumulative lengths (0 first; `bertrt.padding.pack_rows` makes both). Per-token
    outputs are (T, ...) — `last_hidden_state` (T, H) — pooled ones (B, ...). With
    `masked_positions` (token indices into T), the MLM head runs on those tokens only.
    """

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        device = self.device
        input_ids = _as_index(input_ids, "input_ids", device)
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise InputError(f"input_ids: a packed model takes a non-empty 1-D (tokens,) "
                             f"tensor, got shape {tuple(input_ids.shape)}")
        # The offsets are checked, and their longest length read, on the host (given on a
        # device, they are copied back once): on the device each read would be a host sync.
        cu = _as_index(cu_seqlens, "cu_seqlens", torch.device("cpu"))
        lengths = cu[1:] - cu[:-1]
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((lengths <= 0).any()) \
                or int(cu[-1]) != input_ids.numel():
            raise InputError(f"cu_seqlens: expected (batch+1,) increasing offsets from 0 to "
                             f"the token count {input_ids.numel()}, got {cu.tolist()[:8]}")
        longest = int(lengths.max())
        if self.max_positions is not None and longest > self.max_positions:
            raise InputError(f"cu_seqlens: a sequence of {longest} tokens exceeds "
                             f"max_position_embeddings={self.max_positions}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            token_type_ids = _as_index(token_type_ids, "token_type_ids", device)
            _same_shape(token_type_ids, input_ids, "token_type_ids")
        if self.check_inputs:
            _check_range(input_ids, self.vocab_size, "input_ids", "vocab_size")
            _check_range(token_type_ids, self.type_vocab_size, "token_type_ids",
                         "type_vocab_size")
        if masked_positions is not None:
            if not self.takes_masked_positions:
                raise InputError("masked_positions: only the pretraining head takes it")
            masked_positions = _as_index(masked_positions, "masked_positions", device)
            if self.check_inputs:
                _check_range(masked_positions, input_ids.numel(), "masked_positions", "tokens")
        # non-blocking: a blocking copy would wait for the device's queue to drain
        offsets = CuSeqlens(cu.to(torch.int32).to(device, non_blocking=True), longest)
        return self._generated(masked_positions is not None)(
            self.params(), self.training, input_ids, None, token_type_ids,
            masked_positions, offsets)


def lower(graph: Graph, weights: Mapping[str, torch.Tensor],
          checkpoint_layers: bool = False, masked_graph: Graph | None = None) -> LoweredModule:
    """Lower `graph` to an `nn.Module` over `weights` (a dict updated in place to Parameters).

    Args:
        graph: The graph (as built or fused); its inputs must carry the roles of `INPUT_ARGS`.
        weights: Tensors by parameter name; wrapped as the module's parameters, not copied.
        checkpoint_layers: Recompute each encoder layer's activations in the backward pass
            instead of keeping them.
        masked_graph: The masked-MLM form of a pretraining graph (same parameters), run when
            the forward is given `masked_positions`.
    """
    for g in (graph, masked_graph):
        unknown = [v.name for v in (g.inputs if g is not None else ())
                   if v.role not in INPUT_ARGS]
        if unknown:
            raise NotImplementedError(f"graph inputs {unknown} have no role the torch forward "
                                      f"takes ({', '.join(map(str, INPUT_ARGS))})")
    cls = PackedModule if graph.by_role(Role.CU_SEQLENS) is not None else LoweredModule
    return cls(graph, weights, checkpoint_layers,  # type: ignore[arg-type]
               masked_graph=masked_graph)
