"""The op registry: every IR op defined once (inputs, attributes, shape rule, FLOPs rule).

Adding an op touches this file, one entry in each lowering's table, and one reference test;
`tests/graph/test_registry.py` fails when a lowering or a test lacks an op.

FLOPs count matrix products only, at 2 per multiply-add; element-wise work, normalisation and
softmax are memory-bound and counted as 0 (their cost shows in the bytes column instead).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bertrt.graph.ir import BATCH, DType, GraphError, Shape, TensorType


class Op(enum.StrEnum):
    """Every IR op kind. Builders, passes and lowering tables use these members, never string
    literals: a misspelt member fails where it is written, and a kind without a registry entry
    (or a lowering table without an entry for a kind) fails when its module is imported."""

    GATHER = "GATHER"
    POSITION_IDS = "POSITION_IDS"
    ADD = "ADD"
    SCALE = "SCALE"
    LAYER_NORM = "LAYER_NORM"
    LINEAR = "LINEAR"
    GELU = "GELU"
    RELU = "RELU"
    SILU = "SILU"
    TANH = "TANH"
    DROPOUT = "DROPOUT"
    SOFTMAX = "SOFTMAX"
    SPLIT_HEADS = "SPLIT_HEADS"
    MERGE_HEADS = "MERGE_HEADS"
    MATMUL = "MATMUL"
    SELECT_TOKEN = "SELECT_TOKEN"
    SELECT_LAST = "SELECT_LAST"
    GATHER_ROWS = "GATHER_ROWS"
    MASK_INDEX = "MASK_INDEX"
    PACKED_POSITIONS = "PACKED_POSITIONS"
    FIRST_TOKENS = "FIRST_TOKENS"
    EMBED_LAYER_NORM = "EMBED_LAYER_NORM"
    SKIP_LAYER_NORM = "SKIP_LAYER_NORM"
    BIAS_GELU = "BIAS_GELU"
    ATTENTION = "ATTENTION"
    PACKED_ATTENTION = "PACKED_ATTENTION"

Types = Sequence[TensorType | None]
ShapeRule = Callable[[Types, Mapping[str, Any]], list[TensorType]]
FlopsRule = Callable[[list[tuple[int, ...] | None], tuple[int, ...], Mapping[str, Any]], int]


@dataclass(frozen=True)
class OpDef:
    """One op: its input slots (a trailing `?` marks an optional one), attributes with
    defaults, a shape rule over `TensorType`s and a FLOPs rule over concrete shapes."""

    name: Op
    inputs: tuple[str, ...]
    infer: ShapeRule
    attrs: Mapping[str, Any] = field(default_factory=dict)
    flops: FlopsRule | None = None
    fused: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "name", Op(self.name))
        except ValueError:
            raise GraphError(f"op {self.name!r} is not a member of Op") from None

    def bind_attrs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(given) - set(self.attrs)
        if unknown:
            raise GraphError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        out = dict(self.attrs)
        out.update(given)
        missing = [k for k, v in out.items() if v is REQUIRED]
        if missing:
            raise GraphError(f"{self.name}: attribute(s) {missing} required")
        return out

    def count_flops(
        self, in_shapes: list[tuple[int, ...] | None], out_shape: tuple[int, ...],
        attrs: Mapping[str, Any],
    ) -> int:
        return 0 if self.flops is None else int(self.flops(in_shapes, out_shape, attrs))


REQUIRED = object()
REGISTRY: dict[Op, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in REGISTRY:
        raise GraphError(f"op {opdef.name} registered twice")
    REGISTRY[opdef.name] = opdef
    return opdef


def as_op(name: Op | str) -> Op:
    """`name` as an `Op`; an unknown name is a `GraphError`, never a silent non-match."""
    try:
        return Op(name)
    except ValueError:
        raise GraphError(f"unknown op {name!r}") from None


def get_op(name: Op | str) -> OpDef:
    return REGISTRY[as_op(name)]


def check_table(table: Mapping[Op, Any], lowering: str) -> None:
    """Raise unless `table` has exactly one entry per `Op` (called by each lowering on import)."""
    keys = set(table)
    missing = [op.value for op in Op if op not in keys]
    extra = [str(k) for k in keys if not isinstance(k, Op)]
    if missing or extra:
        raise GraphError(f"{lowering} lowering table: missing {missing}, not ops {extra}")


# ---------------------------------------------------------------------- helpers for shape rules
def _need(op: str, types: Types, count: int) -> list[TensorType]:
    present = list(types[:count])
    if any(t is None for t in present) or len(present) < count:
        raise GraphError(f"{op}: expected {count} required input(s)")
    return present  # type: ignore[return-value]


def _rank(op: str, t: TensorType, rank: int, what: str) -> None:
    if len(t.shape) != rank:
        raise GraphError(f"{op}: {what} must have rank {rank}, got shape {list(t.shape)}")


def _same_dim(op: str, a: Any, b: Any, what: str) -> None:
    if a != b:
        raise GraphError(f"{op}: {what} mismatch ({a} vs {b})")


def _float(op: str, t: TensorType, what: str) -> None:
    if not t.dtype.is_float:
        raise GraphError(f"{op}: {what} must be floating point, got {t.dtype}")


def _int(op: str, t: TensorType, what: str) -> None:
    if t.dtype not in (DType.INT64, DType.INT32):
        raise GraphError(f"{op}: {what} must be an integer tensor, got {t.dtype}")


def broadcast(op: str, a: Shape, b: Shape) -> Shape:
    """Numpy broadcasting over ints and symbolic dims (a symbolic dim broadcasts only with 1)."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise GraphError(f"{op}: shapes {list(a)} and {list(b)} do not broadcast")
    return tuple(reversed(out))


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _same_as_first(op: str, float_only: bool = True) -> ShapeRule:
    def rule(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
        (x,) = _need(op, types, 1)
        if float_only:
            _float(op, x, "input")
        return [x]

    return rule


# ---------------------------------------------------------------------- core ops
def _gather(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    table, ids = _need("GATHER", types, 2)
    _rank("GATHER", table, 2, "table")
    _int("GATHER", ids, "indices")
    return [TensorType(table.dtype, ids.shape + (table.shape[1],))]


register(OpDef(
    Op.GATHER, ("table", "indices"), _gather,
    doc="Embedding lookup: rows of `table` (V, H) at integer `indices` (...) -> (..., H).",
))


def _position_ids(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    (ids,) = _need("POSITION_IDS", types, 1)
    _rank("POSITION_IDS", ids, 2, "input_ids")
    return [TensorType(DType.INT64, (ids.shape[1],))]


register(OpDef(
    Op.POSITION_IDS, ("input_ids",), _position_ids,
    doc="Positions 0..S-1 of a (B, S) id tensor -> int64 (S,).",
))


def _add(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    a, b = _need("ADD", types, 2)
    if a.dtype != b.dtype:
        raise GraphError(f"ADD: dtypes differ ({a.dtype} vs {b.dtype})")
    return [TensorType(a.dtype, broadcast("ADD", a.shape, b.shape))]


register(OpDef(Op.ADD, ("a", "b"), _add, doc="Element-wise a + b with broadcasting."))

register(OpDef(
    Op.SCALE, ("x",), _same_as_first("SCALE"), attrs={"factor": REQUIRED},
    doc="x * factor (a constant).",
))


def _layer_norm(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    x, w, b = _need("LAYER_NORM", types, 3)
    _float("LAYER_NORM", x, "input")
    _same_dim("LAYER_NORM", w.shape, (x.shape[-1],), "weight shape")
    _same_dim("LAYER_NORM", b.shape, (x.shape[-1],), "bias shape")
    return [x]


register(OpDef(
    Op.LAYER_NORM, ("x", "weight", "bias"), _layer_norm, attrs={"eps": 1e-12},
    doc="LayerNorm over the last axis, (x - mean) / sqrt(var + eps) * weight + bias.",
))


def _linear(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    x, w = _need("LINEAR", types, 2)
    _float("LINEAR", x, "input")
    _rank("LINEAR", w, 2, "weight")
    _same_dim("LINEAR", x.shape[-1], w.shape[1], "input features vs weight (out, in)")
    b = types[2] if len(types) > 2 else None
    if b is not None:
        _same_dim("LINEAR", b.shape, (w.shape[0],), "bias shape")
    return [TensorType(x.dtype, x.shape[:-1] + (w.shape[0],))]


def _linear_flops(ins: list[Any], out: tuple[int, ...], attrs: Mapping[str, Any]) -> int:
    return 2 * _numel(out) * ins[1][1]


register(OpDef(
    Op.LINEAR, ("x", "weight", "bias?"), _linear, flops=_linear_flops,
    doc="x @ weight.T + bias, weight stored (out, in) as in torch.nn.Linear.",
))

register(OpDef(
    Op.GELU, ("x",), _same_as_first("GELU"), attrs={"approximate": "none"},
    doc="GELU; approximate='none' is the exact erf form, 'tanh' the tanh approximation.",
))
register(OpDef(Op.RELU, ("x",), _same_as_first("RELU"), doc="max(x, 0)."))
register(OpDef(Op.SILU, ("x",), _same_as_first("SILU"), doc="x * sigmoid(x)."))
register(OpDef(Op.TANH, ("x",), _same_as_first("TANH"), doc="tanh(x)."))
register(OpDef(
    Op.DROPOUT, ("x",), _same_as_first("DROPOUT"), attrs={"p": 0.1},
    doc="Dropout with probability p while training; identity at inference.",
))
def _key_mask(op: str, x: TensorType, mask: TensorType | None) -> None:
    """A key mask is (B, S) 1/0 or (B,) int32 lengths, for x (B, ..., S) over S keys."""
    if mask is None:
        return
    _int(op, mask, "key mask")
    if len(mask.shape) == 1:
        if mask.dtype is not DType.INT32:
            raise GraphError(f"{op}: key lengths must be int32, got {mask.dtype}")
        _same_dim(op, mask.shape[0], x.shape[0], "key lengths vs batch")
        return
    _rank(op, mask, 2, "key mask")
    _same_dim(op, mask.shape[0], x.shape[0], "key mask vs batch")


def _softmax(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = _need("SOFTMAX", types, 1)
    _float("SOFTMAX", x, "input")
    mask = types[1] if len(types) > 1 else None
    if mask is not None:
        _rank("SOFTMAX", x, 4, "masked scores (B, N, S, S)")
        if attrs["axis"] not in (-1, 3):
            raise GraphError("SOFTMAX: a key mask needs the softmax over the last axis")
        _key_mask("SOFTMAX", x, mask)
        if len(mask.shape) == 2:
            _same_dim("SOFTMAX", mask.shape[1], x.shape[3], "key mask vs keys")
    return [x]


register(OpDef(
    Op.SOFTMAX, ("x", "key_mask?"), _softmax, attrs={"axis": -1},
    doc="Softmax along `axis`; with `key_mask` ((B, S) 1/0 or (B,) int32 lengths) the scores "
    "(B, N, S, S) of masked keys get float32 min added first, as the reference masks.",
))


def _mask_index(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    (mask,) = _need("MASK_INDEX", types, 1)
    _int("MASK_INDEX", mask, "attention_mask")
    _rank("MASK_INDEX", mask, 2, "attention_mask")
    return [TensorType(DType.INT32, (mask.shape[0],))]


register(OpDef(
    Op.MASK_INDEX, ("attention_mask",), _mask_index,
    doc="(B, S) right-padding 1/0 mask -> int32 (B,) lengths (ONNX Runtime's mask_index).",
))


def _split_heads(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = _need("SPLIT_HEADS", types, 1)
    _rank("SPLIT_HEADS", x, 3, "input")
    heads = attrs["heads"]
    width = x.shape[2]
    if not isinstance(width, int) or width % heads:
        raise GraphError(f"SPLIT_HEADS: width {width} is not divisible by {heads} heads")
    return [TensorType(x.dtype, (x.shape[0], heads, x.shape[1], width // heads))]


register(OpDef(
    Op.SPLIT_HEADS, ("x",), _split_heads, attrs={"heads": REQUIRED},
    doc="(B, S, N*D) -> (B, N, S, D).",
))


def _merge_heads(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = _need("MERGE_HEADS", types, 1)
    _rank("MERGE_HEADS", x, 4, "input")
    b, n, s, d = x.shape
    return [TensorType(x.dtype, (b, s, n * d))]  # type: ignore[operator]


register(OpDef(Op.MERGE_HEADS, ("x",), _merge_heads, doc="(B, N, S, D) -> (B, S, N*D)."))


def _matmul(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    a, b = _need("MATMUL", types, 2)
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise GraphError("MATMUL: inputs must have rank >= 2")
    b_rows, b_cols = (b.shape[-1], b.shape[-2]) if attrs["transpose_b"] else b.shape[-2:]
    _same_dim("MATMUL", a.shape[-1], b_rows, "contraction dim")
    batch = broadcast("MATMUL", a.shape[:-2], b.shape[:-2])
    return [TensorType(a.dtype, batch + (a.shape[-2], b_cols))]


def _matmul_flops(ins: list[Any], out: tuple[int, ...], attrs: Mapping[str, Any]) -> int:
    return 2 * _numel(out) * ins[0][-1]


register(OpDef(
    Op.MATMUL, ("a", "b"), _matmul, attrs={"transpose_b": False}, flops=_matmul_flops,
    doc="Batched a @ b (or a @ b^T with transpose_b).",
))


def _select_token(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = _need("SELECT_TOKEN", types, 1)
    _rank("SELECT_TOKEN", x, 3, "input")
    return [TensorType(x.dtype, (x.shape[0], x.shape[2]))]


register(OpDef(
    Op.SELECT_TOKEN, ("x",), _select_token, attrs={"index": 0},
    doc="(B, S, H) -> (B, H): the token at `index` ([CLS] for 0).",
))


def _select_last(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = _need("SELECT_LAST", types, 1)
    width = x.shape[-1] if x.shape else None
    index = attrs["index"]
    if not isinstance(width, int) or not 0 <= index < width:
        raise GraphError(f"SELECT_LAST: index {index} is outside the last axis of "
                         f"{list(x.shape)}")
    return [TensorType(x.dtype, x.shape[:-1])]


register(OpDef(
    Op.SELECT_LAST, ("x",), _select_last, attrs={"index": REQUIRED},
    doc="(..., C) -> (...): entry `index` of the last axis (a span head's start or end "
    "logit of each token).",
))


def _gather_rows(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    x, idx = _need("GATHER_ROWS", types, 2)
    if len(x.shape) < 2:
        raise GraphError(f"GATHER_ROWS: input must have rank >= 2, got {list(x.shape)}")
    _int("GATHER_ROWS", idx, "positions")
    _rank("GATHER_ROWS", idx, 1, "positions")
    return [TensorType(x.dtype, (idx.shape[0], x.shape[-1]))]


register(OpDef(
    Op.GATHER_ROWS, ("x", "positions"), _gather_rows,
    doc="Rows of x (..., H) at flat positions over its leading dims -> (M, H): b*S+s for "
    "(B, S, H), the token index for packed (T, H) (the masked-MLM graph form).",
))


def _cu_seqlens(op: str, cu: TensorType) -> None:
    _rank(op, cu, 1, "cu_seqlens")
    if cu.dtype is not DType.INT32:
        raise GraphError(f"{op}: cu_seqlens must be int32, got {cu.dtype}")


def _packed_positions(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    cu, ids = _need("PACKED_POSITIONS", types, 2)
    _cu_seqlens("PACKED_POSITIONS", cu)
    _rank("PACKED_POSITIONS", ids, 1, "packed input_ids")
    return [TensorType(DType.INT64, ids.shape)]


register(OpDef(
    Op.PACKED_POSITIONS, ("cu_seqlens", "input_ids"), _packed_positions,
    doc="Packed (T,) ids -> int64 (T,) positions restarting at 0 at each sequence start "
    "cu_seqlens[b] (cu_seqlens (B+1,) int32: 0, len0, len0+len1, ..., T).",
))


def _first_tokens(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    x, cu = _need("FIRST_TOKENS", types, 2)
    _rank("FIRST_TOKENS", x, 2, "packed input (T, H)")
    _cu_seqlens("FIRST_TOKENS", cu)
    return [TensorType(x.dtype, (BATCH, x.shape[1]))]


register(OpDef(
    Op.FIRST_TOKENS, ("x", "cu_seqlens"), _first_tokens,
    doc="Packed (T, H) -> (B, H): each sequence's first token ([CLS]), rows cu_seqlens[:-1].",
))


# ---------------------------------------------------------------------- fused ops
def _embed_layer_norm(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    ids = types[0]
    word, pos, typ, gamma, beta = (types[i] for i in (2, 3, 4, 5, 6))
    if ids is None or any(t is None for t in (word, pos, typ, gamma, beta)):
        raise GraphError("EMBED_LAYER_NORM: expected input_ids and five tables/weights")
    _int("EMBED_LAYER_NORM", ids, "input_ids")
    _rank("EMBED_LAYER_NORM", ids, 2, "input_ids")
    hidden = word.shape[1]  # type: ignore[union-attr]
    for t, what in ((pos, "position table"), (typ, "type table")):
        _same_dim("EMBED_LAYER_NORM", t.shape[1], hidden, what + " width")  # type: ignore
    return [TensorType(word.dtype, ids.shape + (hidden,))]  # type: ignore[union-attr]


register(OpDef(
    Op.EMBED_LAYER_NORM,
    ("input_ids", "token_type_ids?", "word", "position", "token_type", "weight", "bias"),
    _embed_layer_norm, attrs={"eps": 1e-12, "dropout": 0.0}, fused=True,
    doc="LayerNorm(word[ids] + position[0..S-1] + token_type[types]), then dropout.",
))


def _skip_layer_norm(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    x, skip, gamma, beta = _need("SKIP_LAYER_NORM", types, 4)
    _float("SKIP_LAYER_NORM", x, "input")
    _same_dim("SKIP_LAYER_NORM", x.shape, skip.shape, "input vs skip shape")
    _same_dim("SKIP_LAYER_NORM", gamma.shape, (x.shape[-1],), "weight shape")
    bias = types[4] if len(types) > 4 else None
    if bias is not None:
        _same_dim("SKIP_LAYER_NORM", bias.shape, (x.shape[-1],), "bias shape")
    return [x]


register(OpDef(
    Op.SKIP_LAYER_NORM, ("x", "skip", "weight", "beta", "bias?"), _skip_layer_norm,
    attrs={"eps": 1e-12, "dropout": 0.0}, fused=True,
    doc="LayerNorm(dropout(x + bias) + skip): a sub-layer's residual add and norm.",
))


def _bias_gelu(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    x, bias = _need("BIAS_GELU", types, 2)
    _float("BIAS_GELU", x, "input")
    _same_dim("BIAS_GELU", bias.shape, (x.shape[-1],), "bias shape")
    return [x]


register(OpDef(
    Op.BIAS_GELU, ("x", "bias"), _bias_gelu, attrs={"approximate": "none"}, fused=True,
    doc="gelu(x + bias) (exact erf form, or tanh with approximate='tanh').",
))


def _projections(op: str, types: Types, attrs: Mapping[str, Any], rank: int) -> TensorType:
    """Check attention's input (rank `rank`, width H last) and its three (H, H) projections."""
    x, wq, bq, wk, bk, wv, bv = _need(op, types, 7)
    _rank(op, x, rank, "input")
    width = x.shape[-1]
    for w, what in ((wq, "query"), (wk, "key"), (wv, "value")):
        _same_dim(op, w.shape, (width, width), what + " weight shape")
    if width % attrs["heads"]:  # type: ignore[operator]
        raise GraphError(f"{op}: width {width} not divisible by {attrs['heads']}")
    return x


def _attention(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    x = _projections("ATTENTION", types, attrs, rank=3)
    mask = types[7] if len(types) > 7 else None
    _key_mask("ATTENTION", x, mask)
    if mask is not None and len(mask.shape) == 2:
        _same_dim("ATTENTION", mask.shape[1], x.shape[1], "key mask vs seq")
    return [x]


def _attention_flops(ins: list[Any], out: tuple[int, ...], attrs: Mapping[str, Any]) -> int:
    b, s, h = out
    projections = 3 * 2 * b * s * h * h
    scores_and_context = 2 * 2 * b * s * s * h
    return projections + scores_and_context


register(OpDef(
    Op.ATTENTION,
    ("x", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "key_mask?"),
    _attention, attrs={"heads": REQUIRED, "scale": REQUIRED, "dropout": 0.0},
    flops=_attention_flops, fused=True,
    doc="Multi-head self-attention context (before the output projection): "
    "softmax(Q K^T * scale + bias(key_mask)) V with Q, K, V projected from x; `key_mask` is "
    "(B, S) 1/0 or (B,) int32 lengths (see SOFTMAX). Lowerings may pack the three "
    "projections into one (B, S, 3H) product.",
))


def _packed_attention(types: Types, attrs: Mapping[str, Any]) -> list[TensorType]:
    x = _projections("PACKED_ATTENTION", types, attrs, rank=2)
    _cu_seqlens("PACKED_ATTENTION", _need("PACKED_ATTENTION", types, 8)[7])
    return [x]


def _packed_attention_flops(ins: list[Any], out: tuple[int, ...],
                            attrs: Mapping[str, Any]) -> int:
    t, h = out  # the sequence lengths are not in the shapes: count the projections only
    return 3 * 2 * t * h * h


register(OpDef(
    Op.PACKED_ATTENTION,
    ("x", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "cu_seqlens"),
    _packed_attention, attrs={"heads": REQUIRED, "scale": REQUIRED, "dropout": 0.0},
    flops=_packed_attention_flops, fused=True,
    doc="ATTENTION over packed tokens (T, H): each sequence cu_seqlens[b]:cu_seqlens[b+1] "
    "attends to itself only; the projections run on the T real tokens.",
))

_unregistered = [op.value for op in Op if op not in REGISTRY]
if _unregistered:
    raise GraphError(f"ops without a registry entry: {_unregistered}")
