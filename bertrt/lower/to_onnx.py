"""Lowering to ONNX: a table from IR op to ONNX emission, written with `onnx.helper`.

`export(graph, weights, path, flavour=...)` writes one inference model. Two flavours:

- `standard`: core ONNX ops only (LayerNormalization, MatMul, Softmax, Erf or Gelu, ...); fused
  IR ops are written as their core-op equivalents, so any ONNX runtime loads the file.
- `ort`: the fused IR ops become ONNX Runtime's `com.microsoft` contrib ops
  (EmbedLayerNormalization, Attention with packed QKV, BiasGelu or FastGelu); unfused IR ops
  are written as core ops, and so is SKIP_LAYER_NORM from opset 17 (Add +
  LayerNormalization, which ONNX Runtime's CPU provider runs faster than its
  SkipLayerNormalization: see `ONNX_OPS`).

Inputs are `input_ids`, `attention_mask` and `token_type_ids`, int64 (batch, seq); the
pretraining head is exported in its full form (the MLM head on every position), not the
masked-MLM training form.
Outputs are the graph's outputs by name. Weights arrive as numpy arrays keyed by the graph's
parameter names; this module imports neither torch nor anything that needs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from bertrt.errors import BertrtError
from bertrt.fileio import atomic_write_bytes, file_mode, temp_dir
from bertrt.graph.ir import DType, Graph, Node, Role, SymbolicDim, Value, ValueKind
from bertrt.graph.ops import REGISTRY, Op, check_table

FLAVOURS = ("ort", "standard")
#: 17 is the first opset with LayerNormalization and is read by every maintained runtime
#: (ONNX Runtime >= 1.12, TensorRT >= 8.6, OpenVINO); 20 only adds Gelu as a single op.
DEFAULT_OPSET = 17
#: int8 exports run on ONNX Runtime's CPU provider only: opset 20's core Gelu runs fused there
#: (10% of MiniLM's int8 time at opset 17 went to its unfused Erf/Mul/Add form).
INT8_OPSET = 20
#: Below 13, Softmax/Unsqueeze/Split have other semantics; bertrt does not write them.
MIN_OPSET = 13
MS_DOMAIN = "com.microsoft"
MS_DOMAIN_VERSION = 1
#: Initializer bytes above which weights go to `<name>.onnx.data` (protobuf's 2 GiB limit,
#: less room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26

_FLOAT32_MIN = float(np.finfo(np.float32).min)
_ELEM = {DType.FLOAT32: TensorProto.FLOAT, DType.FLOAT16: TensorProto.FLOAT16,
         DType.BFLOAT16: TensorProto.BFLOAT16, DType.INT64: TensorProto.INT64,
         DType.INT32: TensorProto.INT32, DType.BOOL: TensorProto.BOOL}
_INT64 = TensorProto.INT64
_INT32 = TensorProto.INT32
_FLOAT = TensorProto.FLOAT


# ---------------------------------------------------------------------- the emission context
class Emitter:
    """What emission functions write into: ONNX nodes, initializers, and the name of the
    tensor that holds each IR value. Tracks every tensor's element type so emitters can cast
    where types meet (fp16 activations, fp32 mask bias and softmax)."""

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray], flavour: str,
                 opset: int, fp16: bool, padding: str = "right") -> None:
        self.graph = graph
        #: "right": masks are right padding (sequence lengths suffice); "any": any 0/1 mask.
        self.padding = padding
        self.weights = weights
        self.flavour = flavour
        self.opset = opset
        #: The element type of float activations and weights.
        self.float_type = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
        self.nodes: list[NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.dtypes: dict[str, int] = {}
        self.names: dict[int, str | None] = {}
        self.current: Node | None = None
        self._used: set[str] = set(graph.outputs) | {v.name for v in graph.inputs}
        self._used |= set(graph.params)
        self._cache: dict[tuple[Any, ...], str] = {}
        #: Structured values written once per graph (the packed layout's tensors).
        self.memo: dict[tuple[Any, ...], Any] = {}
        #: ONNX node name -> the IR node it was emitted for.
        self.origin: dict[str, Node] = {}

    # ------------------------------------------------------------------ names and values
    def fresh(self, hint: str) -> str:
        name, k = hint, 0
        while name in self._used:
            k += 1
            name = f"{hint}_{k}"
        self._used.add(name)
        return name

    def value(self, value: Value | None) -> str | None:
        """The tensor holding an IR value (None for an absent optional input)."""
        if value is None:
            return None
        if value.kind is ValueKind.PARAM:
            return self.param(value.name)
        return self.names[id(value)]

    def inputs(self, node: Node) -> list[str | None]:
        return [self.value(v) for v in node.inputs]

    def require(self, opset: int, what: str) -> None:
        """Fail with a user error when the target opset lacks `what`."""
        if self.opset < opset:
            where = f" for {self.current.name} ({self.current.op})" if self.current else ""
            raise BertrtError(f"opset: {self.opset} is too old for {what}{where}; "
                              f"use opset >= {opset}")

    # ------------------------------------------------------------------ initializers
    def param(self, name: str) -> str:
        """A graph parameter as an initializer in the float type (stored once)."""
        if name not in self.initializers:
            self._add_initializer(name, self.weights[name])
        return name

    def derived(self, hint: str, make: Callable[[], np.ndarray]) -> str:
        """An initializer computed from parameters (packed QKV, transposed weights), once."""
        key = ("derived", hint)
        if key not in self._cache:
            self._cache[key] = self._add_initializer(self.fresh(hint), make())
        return self._cache[key]

    def const(self, value: Any, dtype: int) -> str:
        """A small constant initializer: a scalar for a number, a vector for a list."""
        arr = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        key = ("const", dtype, arr.shape, arr.tobytes())
        if key not in self._cache:
            name = self.fresh(f"const_{helper.tensor_dtype_to_np_dtype(dtype).name}")
            self.initializers[name] = numpy_helper.from_array(arr, name)
            self.dtypes[name] = dtype
            self._cache[key] = name
        return self._cache[key]

    def _add_initializer(self, name: str, array: np.ndarray) -> str:
        arr = np.asarray(array)
        if arr.dtype.kind == "f":
            if self.float_type == TensorProto.FLOAT16 and arr.size and (
                    float(np.abs(arr).max()) > float(np.finfo(np.float16).max)):
                raise BertrtError(f"weights: {name} holds values beyond the fp16 range "
                                  "(|x| > 65504); export it with fp16=False")
            arr = arr.astype(helper.tensor_dtype_to_np_dtype(self.float_type))
            dtype = self.float_type
        else:
            dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.dtypes[name] = dtype
        return name

    # ------------------------------------------------------------------ nodes
    def node(self, op_type: str, inputs: Sequence[str | None], *, domain: str = "",
             dtype: int | None = None, **attrs: Any) -> str:
        """Append one single-output node; its output type is `dtype` or its first input's."""
        names = ["" if i is None else i for i in inputs]
        while names and not names[-1]:
            names.pop()
        hint = self.current.name if self.current is not None else "bertrt"
        out = self.fresh(f"{hint}/{op_type}")
        self.nodes.append(helper.make_node(op_type, names, [out], name=out, domain=domain,
                                           **attrs))
        if self.current is not None:
            self.origin[out] = self.current
        self.dtypes[out] = dtype if dtype is not None else self.dtypes[next(n for n in names
                                                                            if n)]
        return out

    def cached(self, key: tuple[Any, ...]) -> str | None:
        return self._cache.get(key)

    def set_cached(self, key: tuple[Any, ...], name: str) -> None:
        self._cache[key] = name

    def cast(self, name: str, to: int) -> str:
        """`name` as element type `to` (one Cast per tensor and type)."""
        if self.dtypes[name] == to:
            return name
        key = ("cast", name, to)
        if key not in self._cache:
            self._cache[key] = self.node("Cast", [name], to=to, dtype=to)
        return self._cache[key]

    def dim(self, name: str, axis: int, vector: bool = False) -> str:
        """Run-time size of one axis of `name`: an int64 scalar, or a (1,) vector."""
        key = ("dim", name, axis, vector)
        if key not in self._cache:
            if ("shape", name) not in self._cache:
                self._cache[("shape", name)] = self.node("Shape", [name], dtype=_INT64)
            shape = self._cache[("shape", name)]
            index = self.const([axis] if vector else axis, _INT64)
            self._cache[key] = self.node("Gather", [shape, index], axis=0)
        return self._cache[key]


Emit = Callable[[Emitter, Node], "str | None"]


@dataclass(frozen=True)
class OnnxOp:
    """How one IR op is written: `standard` (core ops) and, where ONNX Runtime has a fused
    contrib op, `ort`. Calling the entry picks by the emitter's flavour."""

    standard: Emit
    ort: Emit | None = None

    def __call__(self, ctx: Emitter, node: Node) -> str | None:
        if ctx.flavour == "ort" and self.ort is not None:
            return self.ort(ctx, node)
        return self.standard(ctx, node)


# ---------------------------------------------------------------------- shared pieces
def _layer_norm_core(ctx: Emitter, x: str, weight: str, bias: str, eps: float) -> str:
    ctx.require(17, "LayerNormalization")
    # stash_type=1: mean and variance in fp32 whatever the input type
    return ctx.node("LayerNormalization", [x, weight, bias], axis=-1, epsilon=float(eps),
                    stash_type=1)


def _gelu_core(ctx: Emitter, x: str, approximate: str) -> str:
    if ctx.opset >= 20:
        return ctx.node("Gelu", [x], approximate=approximate)
    t = ctx.dtypes[x]
    if approximate == "tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = ctx.node("Mul", [ctx.node("Mul", [x, x]), x])
        inner = ctx.node("Add", [x, ctx.node("Mul", [cube, ctx.const(0.044715, t)])])
        inner = ctx.node("Mul", [inner, ctx.const(math.sqrt(2.0 / math.pi), t)])
        gate = ctx.node("Tanh", [inner])
    else:
        # 0.5 x (1 + erf(x / sqrt(2)))
        gate = ctx.node("Erf", [ctx.node("Mul", [x, ctx.const(1.0 / math.sqrt(2.0), t)])])
    gate = ctx.node("Add", [gate, ctx.const(1.0, t)])
    return ctx.node("Mul", [ctx.node("Mul", [x, ctx.const(0.5, t)]), gate])


def _softmax_core(ctx: Emitter, x: str, axis: int) -> str:
    # accumulate in fp32 whatever the activation type; hand back the activation type
    probs = ctx.node("Softmax", [ctx.cast(x, _FLOAT)], axis=axis)
    return ctx.cast(probs, ctx.float_type)


def _add_core(ctx: Emitter, a: str, b: str) -> str:
    if ctx.dtypes[a] != ctx.dtypes[b]:  # fp16 scores + fp32 mask bias: add in fp32
        a, b = ctx.cast(a, _FLOAT), ctx.cast(b, _FLOAT)
    return ctx.node("Add", [a, b])


def _key_mask_bias(ctx: Emitter, mask: Value, keys_of: str, axis: int) -> str:
    """The additive (B, 1, 1, S) fp32 bias of a key mask ((B, S) 1/0, or (B,) int32 lengths
    over the S keys on axis `axis` of `keys_of`): 0 where attended, float32 min where not.
    Written once per mask; every layer reads it."""
    name = ctx.value(mask)
    key = ("mask_bias", name)
    if ctx.cached(key) is None:
        if len(mask.shape) == 1:  # lengths -> (B, S) keep = arange(S) < length
            keys = ctx.cast(ctx.dim(keys_of, axis), _INT32)
            arange = ctx.node("Range", [ctx.const(0, _INT32), keys, ctx.const(1, _INT32)],
                              dtype=_INT32)
            lengths = ctx.node("Unsqueeze", [name, ctx.const([1], _INT64)])
            keep = ctx.node("Less", [ctx.node("Unsqueeze", [arange, ctx.const([0], _INT64)]),
                                     lengths], dtype=TensorProto.BOOL)
            name = keep
        keep = ctx.node("Unsqueeze", [ctx.cast(name, _FLOAT), ctx.const([1, 2], _INT64)])
        drop = ctx.node("Sub", [ctx.const(1.0, _FLOAT), keep])
        ctx.set_cached(key, ctx.node("Mul", [drop, ctx.const(_FLOAT32_MIN, _FLOAT)]))
    return ctx.cached(key)  # type: ignore[return-value]


def _linear_weight_is_private(value: Value | None) -> bool:
    """True if only LINEAR weight slots read this parameter (so a transposed copy can replace
    it); a weight tied to an embedding table is stored once and read in place instead."""
    return (value is not None and value.kind is ValueKind.PARAM
            and all(n.op == "LINEAR" and i == 1 for n, i in value.users))


def _transpose_last2(ctx: Emitter, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return ctx.node("Transpose", [x], perm=perm)


# ---------------------------------------------------------------------- core ops
def _gather(ctx: Emitter, node: Node) -> str:
    table, ids = ctx.inputs(node)
    return ctx.node("Gather", [table, ids], axis=0)  # (V, H)[(B, S)] -> (B, S, H)


def _position_ids(ctx: Emitter, node: Node) -> str:
    (ids,) = ctx.inputs(node)
    seq = ctx.dim(ids, 1)
    return ctx.node("Range", [ctx.const(0, _INT64), seq, ctx.const(1, _INT64)], dtype=_INT64)


def _add(ctx: Emitter, node: Node) -> str:
    a, b = ctx.inputs(node)
    return _add_core(ctx, a, b)


def _scale(ctx: Emitter, node: Node) -> str:
    (x,) = ctx.inputs(node)
    return ctx.node("Mul", [x, ctx.const(node.attrs["factor"], ctx.dtypes[x])])


def _layer_norm(ctx: Emitter, node: Node) -> str:
    x, w, b = ctx.inputs(node)
    return _layer_norm_core(ctx, x, w, b, node.attrs["eps"])


def _linear(ctx: Emitter, node: Node) -> str:
    x, w, b = ctx.inputs(node)
    xv, wv = node.inputs[0], node.inputs[1]
    rank = len(xv.shape)
    n_out = wv.shape[0]
    if _linear_weight_is_private(wv):
        # (..., in) @ (in, out): the weight stored pre-transposed
        wt = ctx.derived(wv.name + ".T", lambda: np.asarray(ctx.weights[wv.name]).T)
        y = ctx.node("MatMul", [x, wt])
        return y if b is None else ctx.node("Add", [y, b])
    if wv.kind is not ValueKind.PARAM:
        y = ctx.node("MatMul", [x, _transpose_last2(ctx, w, 2)])
        return y if b is None else ctx.node("Add", [y, b])
    # A tied weight (the MLM decoder reads the word table): Gemm with transB reads the (out, in)
    # table in place. (B, S, in) -> (B*S, in) -> (B*S, out) -> (B, S, out)
    if rank == 2:
        return ctx.node("Gemm", [x, w, b], transB=1)
    flat = ctx.node("Reshape", [x, ctx.const([-1, wv.shape[1]], _INT64)])
    y = ctx.node("Gemm", [flat, w, b], transB=1)
    lead = ctx.node("Slice", [ctx.node("Shape", [x], dtype=_INT64), ctx.const([0], _INT64),
                              ctx.const([-1], _INT64)])
    shape = ctx.node("Concat", [lead, ctx.const([n_out], _INT64)], axis=0)
    return ctx.node("Reshape", [y, shape])


def _gelu(ctx: Emitter, node: Node) -> str:
    (x,) = ctx.inputs(node)
    return _gelu_core(ctx, x, node.attrs["approximate"])


def _relu(ctx: Emitter, node: Node) -> str:
    return ctx.node("Relu", ctx.inputs(node))


def _silu(ctx: Emitter, node: Node) -> str:
    (x,) = ctx.inputs(node)
    return ctx.node("Mul", [x, ctx.node("Sigmoid", [x])])


def _tanh(ctx: Emitter, node: Node) -> str:
    return ctx.node("Tanh", ctx.inputs(node))


def _identity(ctx: Emitter, node: Node) -> str | None:
    return ctx.value(node.inputs[0])  # dropout at inference; no node written


def _softmax(ctx: Emitter, node: Node) -> str:
    x = ctx.value(node.inputs[0])
    mask = node.inputs[1] if len(node.inputs) > 1 else None
    if mask is not None:  # scores (B, N, S, S): the keys are axis 3
        x = _add_core(ctx, x, _key_mask_bias(ctx, mask, x, axis=3))
    return _softmax_core(ctx, x, node.attrs["axis"])


def _mask_index(ctx: Emitter, node: Node) -> str:
    (mask,) = ctx.inputs(node)
    # (B, S) right-padding mask -> int32 (B,) lengths, the mask_index ONNX Runtime reads
    return ctx.node("ReduceSum", [ctx.cast(mask, _INT32), ctx.const([1], _INT64)], keepdims=0)


def _split_heads(ctx: Emitter, node: Node) -> str:
    (x,) = ctx.inputs(node)
    heads = node.attrs["heads"]
    width = node.inputs[0].shape[2]
    # (B, S, N*D) -> (B, S, N, D) -> (B, N, S, D)
    split = ctx.node("Reshape", [x, ctx.const([0, 0, heads, width // heads], _INT64)])
    return ctx.node("Transpose", [split], perm=[0, 2, 1, 3])


def _merge_heads(ctx: Emitter, node: Node) -> str:
    (x,) = ctx.inputs(node)
    _, n, _, d = node.inputs[0].shape
    # (B, N, S, D) -> (B, S, N, D) -> (B, S, N*D)
    merged = ctx.node("Transpose", [x], perm=[0, 2, 1, 3])
    return ctx.node("Reshape", [merged, ctx.const([0, 0, n * d], _INT64)])


def _matmul(ctx: Emitter, node: Node) -> str:
    a, b = ctx.inputs(node)
    if node.attrs["transpose_b"]:
        b = _transpose_last2(ctx, b, len(node.inputs[1].shape))
    return ctx.node("MatMul", [a, b])


def _select_token(ctx: Emitter, node: Node) -> str:
    (x,) = ctx.inputs(node)
    # (B, S, H) -> (B, H): a scalar index drops the axis
    return ctx.node("Gather", [x, ctx.const(node.attrs["index"], _INT64)], axis=1)


def _select_last(ctx: Emitter, node: Node) -> str:
    (x,) = ctx.inputs(node)
    # (..., C) -> (...): a scalar index drops the axis
    return ctx.node("Gather", [x, ctx.const(node.attrs["index"], _INT64)], axis=-1)


def _gather_rows(ctx: Emitter, node: Node) -> str:
    x, positions = ctx.inputs(node)
    flat = ctx.node("Reshape", [x, ctx.const([-1, node.inputs[0].shape[2]], _INT64)])
    return ctx.node("Gather", [flat, positions], axis=0)  # (B*S, H) -> (M, H)


# ---------------------------------------------------------------------- fused ops, core form
def _embed_layer_norm(ctx: Emitter, node: Node) -> str:
    ids, types, word, position, token_type, weight, bias = ctx.inputs(node)
    x = ctx.node("Gather", [word, ids], axis=0)  # (B, S, H)
    if types is None:
        t = ctx.node("Gather", [token_type, ctx.const(0, _INT64)], axis=0)  # (H,)
    else:
        t = ctx.node("Gather", [token_type, types], axis=0)
    x = ctx.node("Add", [x, t])
    # position[0..S-1]: (S, H), broadcast over the batch
    pos = ctx.node("Slice", [position, ctx.const([0], _INT64), ctx.dim(ids, 1, vector=True),
                             ctx.const([0], _INT64)])
    x = ctx.node("Add", [x, pos])
    return _layer_norm_core(ctx, x, weight, bias, node.attrs["eps"])


def _skip_layer_norm(ctx: Emitter, node: Node) -> str:
    x, skip, weight, beta, bias = ctx.inputs(node)
    if bias is not None:
        x = ctx.node("Add", [x, bias])
    x = ctx.node("Add", [x, skip])
    return _layer_norm_core(ctx, x, weight, beta, node.attrs["eps"])


def _bias_gelu(ctx: Emitter, node: Node) -> str:
    x, bias = ctx.inputs(node)
    return _gelu_core(ctx, ctx.node("Add", [x, bias]), node.attrs["approximate"])


def _packed_qkv(ctx: Emitter, node: Node) -> tuple[str, str]:
    """The three projections as one (H, 3H) weight and (3H,) bias, columns [Q | K | V]."""
    wq, bq, wk, bk, wv, bv = node.inputs[1:7]
    weights, biases = (wq, wk, wv), (bq, bk, bv)
    if all(v.kind is ValueKind.PARAM for v in (*weights, *biases)):
        w = ctx.derived(f"{node.name}.qkv.weight", lambda: np.concatenate(
            [np.asarray(ctx.weights[v.name]).T for v in weights], axis=1))
        b = ctx.derived(f"{node.name}.qkv.bias", lambda: np.concatenate(
            [np.asarray(ctx.weights[v.name]) for v in biases]))
        return w, b
    w = ctx.node("Concat", [_transpose_last2(ctx, ctx.value(v), 2) for v in weights], axis=1)
    b = ctx.node("Concat", [ctx.value(v) for v in biases], axis=0)
    return w, b


def _attention(ctx: Emitter, node: Node) -> str:
    x = ctx.value(node.inputs[0])
    mask = node.inputs[7]
    heads, hidden = node.attrs["heads"], node.inputs[0].shape[2]
    w, b = _packed_qkv(ctx, node)
    qkv = ctx.node("Add", [ctx.node("MatMul", [x, w]), b])  # (B, S, 3H)
    # (B, S, 3H) -> (B, S, 3, N, D) -> (3, B, N, S, D)
    qkv = ctx.node("Reshape", [qkv, ctx.const([0, 0, 3, heads, hidden // heads], _INT64)])
    qkv = ctx.node("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
    q, k, v = (ctx.node("Gather", [qkv, ctx.const(i, _INT64)], axis=0) for i in range(3))
    # (B, N, S, D) @ (B, N, D, S) -> (B, N, S, S)
    scores = ctx.node("MatMul", [q, ctx.node("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = ctx.node("Mul", [scores, ctx.const(node.attrs["scale"], ctx.dtypes[scores])])
    if mask is not None:
        scores = _add_core(ctx, scores, _key_mask_bias(ctx, mask, x, axis=1))
    probs = _softmax_core(ctx, scores, -1)
    context = ctx.node("MatMul", [probs, v])  # (B, N, S, D)
    context = ctx.node("Transpose", [context], perm=[0, 2, 1, 3])
    return ctx.node("Reshape", [context, ctx.const([0, 0, hidden], _INT64)])  # (B, S, H)


# ---------------------------------------------------------------------- packed ops
#: A packed batch's attention runs on this many padded views, its sequences grouped by length:
#: view 0 holds those longer than half the longest, view 1 those longer than a quarter, ... the
#: last every shorter one (`_packed_index`). One view pads every sequence to the longest;
#: arrival-order batches of real text (~10 sequences, ~300 tokens) then compute ~5x the score
#: positions they need, three views ~1.4x.
ATTENTION_VIEWS = 3


def _i64(ctx: Emitter, *values: int) -> str:
    """An int64 vector constant."""
    return ctx.const(list(values), _INT64)


def _packed_index(ctx: Emitter, cu_value: Value) -> dict[str, Any]:
    """Per packed batch, written once: each token's sequence `seq` and position `pos` (T,),
    the `slots` of the tokens in the attention views' rows concatenated (T,), and per view
    (`views`, ATTENTION_VIEWS of them) its source token per slot `src` (Bv*Sv,) (slots past a
    length read token 0: their keys are masked and their outputs dropped), its key `bias`
    (Bv, 1, 1, Sv) and its `shape` (Bv, Sv) as a (2,) vector.

    A sequence goes to view v when its length times 2**v is more than the longest's and
    times 2**(v+1) is not (the last view takes every shorter one), so each view pads its
    sequences to less than twice their length. A view with no sequence is (0, 1) rows."""
    cu = ctx.value(cu_value)
    key = ("packed", cu)
    if key not in ctx.memo:
        cu64 = ctx.cast(cu, _INT64)
        starts = ctx.node("Slice", [cu64, _i64(ctx, 0), _i64(ctx, -1)])
        ends = ctx.node("Slice", [cu64, _i64(ctx, 1), ctx.dim(cu64, 0, vector=True)])
        total = ctx.node("Gather", [cu64, ctx.const(-1, _INT64)], axis=0)
        t = ctx.node("Range", [ctx.const(0, _INT64), total, ctx.const(1, _INT64)])
        # seq[t] = how many sequence ends are <= t: (T, 1) >= (1, B) summed over B
        after = ctx.node("GreaterOrEqual", [ctx.node("Unsqueeze", [t, _i64(ctx, 1)]),
                                            ctx.node("Unsqueeze", [ends, _i64(ctx, 0)])],
                         dtype=TensorProto.BOOL)
        seq = ctx.node("ReduceSum", [ctx.cast(after, _INT64), _i64(ctx, 1)], keepdims=0)
        pos = ctx.node("Sub", [t, ctx.node("Gather", [starts, seq], axis=0)])
        lengths = ctx.node("Sub", [ends, starts])
        longest = ctx.node("ReduceMax", [lengths], keepdims=1)  # (1,)
        # view[b] = how many of 2 x length, 4 x length, ... fit within the longest
        view = None
        for v in range(1, ATTENTION_VIEWS):
            fits = ctx.cast(ctx.node("LessOrEqual", [
                ctx.node("Mul", [lengths, ctx.const(2 ** v, _INT64)]), longest],
                dtype=TensorProto.BOOL), _INT64)
            view = fits if view is None else ctx.node("Add", [view, fits])
        views, members, bases = [], [], []
        offset = ctx.const([0], _INT64)  # the view's first row among the views' rows
        for v in range(ATTENTION_VIEWS):
            if view is None:
                member = ctx.node("Range", [ctx.const(0, _INT64), ctx.dim(lengths, 0),
                                            ctx.const(1, _INT64)])
            else:
                member = ctx.node("Reshape", [
                    ctx.node("NonZero", [ctx.node("Equal", [view, ctx.const(v, _INT64)],
                                                  dtype=TensorProto.BOOL)]), _i64(ctx, -1)])
            one, size, width = _packed_view(ctx, starts, lengths, member)
            views.append(one)
            # the first row of each member's sequence: the view's offset + its rank x Sv
            rank = ctx.node("Range", [ctx.const(0, _INT64), ctx.dim(member, 0),
                                      ctx.const(1, _INT64)])
            members.append(member)
            bases.append(ctx.node("Add", [offset, ctx.node("Mul", [rank, width])]))
            offset = ctx.node("Add", [offset, ctx.node("Mul", [size, width])])
        if len(views) == 1:
            base = bases[0]
        else:  # base[members[v][i]] = bases[v][i]: each sequence is in one view
            base = ctx.node("ScatterElements", [
                ctx.node("Mul", [lengths, ctx.const(0, _INT64)]),
                ctx.node("Concat", members, axis=0), ctx.node("Concat", bases, axis=0)],
                axis=0)
        slots = ctx.node("Add", [ctx.node("Gather", [base, seq], axis=0), pos])
        ctx.memo[key] = dict(seq=seq, pos=pos, slots=slots, views=views)
    return ctx.memo[key]


def _packed_view(ctx: Emitter, starts: str, lengths: str, member: str
                 ) -> tuple[dict[str, str], str, str]:
    """One attention view of the sequences `member` (Bv,) of a packed batch: its `src`, `bias`
    and `shape` (see `_packed_index`), and Bv and Sv as (1,) vectors. Sv is the members'
    longest, at least 1: an empty view is (0, 1), whose ops all have defined shapes."""
    own = ctx.node("Gather", [lengths, member], axis=0)  # (Bv,)
    width = ctx.node("ReduceMax", [ctx.node("Concat", [_i64(ctx, 1), own], axis=0)], keepdims=1)
    size = ctx.dim(member, 0, vector=True)
    s = ctx.node("Unsqueeze", [ctx.node("Range", [
        ctx.const(0, _INT64), ctx.node("Squeeze", [width, _i64(ctx, 0)]), ctx.const(1, _INT64)]),
        _i64(ctx, 0)])  # (1, Sv)
    valid = ctx.node("Less", [s, ctx.node("Unsqueeze", [own, _i64(ctx, 1)])],
                     dtype=TensorProto.BOOL)  # (Bv, Sv)
    first = ctx.node("Gather", [starts, member], axis=0)
    index = ctx.node("Add", [ctx.node("Unsqueeze", [first, _i64(ctx, 1)]), s])
    src = ctx.node("Reshape", [ctx.node("Where", [valid, index, ctx.const(0, _INT64)]),
                               _i64(ctx, -1)])
    keep = ctx.node("Unsqueeze", [ctx.cast(valid, _FLOAT), _i64(ctx, 1, 2)])
    bias = ctx.node("Mul", [ctx.node("Sub", [ctx.const(1.0, _FLOAT), keep]),
                            ctx.const(_FLOAT32_MIN, _FLOAT)])
    return (dict(src=src, bias=bias, shape=ctx.node("Concat", [size, width], axis=0)),
            size, width)


def _packed_positions(ctx: Emitter, node: Node) -> str:
    return _packed_index(ctx, node.inputs[0])["pos"]


def _first_tokens(ctx: Emitter, node: Node) -> str:
    x, cu = ctx.inputs(node)
    starts = ctx.node("Slice", [ctx.cast(cu, _INT64), ctx.const([0], _INT64),
                                ctx.const([-1], _INT64)])
    return ctx.node("Gather", [x, starts], axis=0)  # (T, H) -> (B, H)


def _packed_attention(ctx: Emitter, node: Node) -> str:
    layout = _packed_index(ctx, node.inputs[7])
    x = ctx.value(node.inputs[0])
    heads, hidden = node.attrs["heads"], node.inputs[0].shape[1]
    w, b = _packed_qkv(ctx, node)
    qkv = ctx.node("Add", [ctx.node("MatMul", [x, w]), b])  # (T, 3H): real tokens only
    flats = []
    for view in layout["views"]:
        # (T, 3H) -> (Bv*Sv, 3H) -> (Bv, Sv, 3, N, D) -> (3, Bv, N, Sv, D); an empty view's
        # Bv of 0 is Reshape's "copy the input's dimension", which is 0 too
        padded = ctx.node("Gather", [qkv, view["src"]], axis=0)
        key = ("packed view shape", view["shape"], heads, hidden)
        if key not in ctx.memo:  # every layer's attention reads it
            ctx.memo[key] = ctx.node("Concat", [view["shape"], _i64(ctx, 3, heads,
                                                                     hidden // heads)], axis=0)
        shape = ctx.memo[key]
        split = ctx.node("Transpose", [ctx.node("Reshape", [padded, shape])],
                         perm=[2, 0, 3, 1, 4])
        q, k, v = (ctx.node("Gather", [split, ctx.const(i, _INT64)], axis=0) for i in range(3))
        scores = ctx.node("MatMul", [q, ctx.node("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = ctx.node("Mul", [scores, ctx.const(node.attrs["scale"], ctx.dtypes[scores])])
        probs = _softmax_core(ctx, _add_core(ctx, scores, view["bias"]), -1)
        context = ctx.node("Transpose", [ctx.node("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        # (Bv, Sv, N, D) -> (Bv*Sv, H)
        flats.append(ctx.node("Reshape", [context, ctx.const([-1, hidden], _INT64)]))
    flat = flats[0] if len(flats) == 1 else ctx.node("Concat", flats, axis=0)
    return ctx.node("Gather", [flat, layout["slots"]], axis=0)  # the real tokens (T, H)


# ---------------------------------------------------------------------- fused ops, ort form
def _ort_embed_layer_norm(ctx: Emitter, node: Node) -> str:
    ids, types, word, position, token_type, weight, bias = ctx.inputs(node)
    if types is None:  # the contrib op reads segment ids or no segment table at all
        return _embed_layer_norm(ctx, node)
    inputs = [ctx.cast(ids, _INT32), ctx.cast(types, _INT32), word, position, token_type,
              weight, bias]
    # mask_index_type=0: no mask_index output (MASK_INDEX makes the lengths Attention reads)
    return ctx.node("EmbedLayerNormalization", inputs, domain=MS_DOMAIN, dtype=ctx.dtypes[word],
                    epsilon=float(node.attrs["eps"]), mask_index_type=0)


def _ort_attention(ctx: Emitter, node: Node) -> str:
    mask = node.inputs[7]
    # mask_index: int32 (B,) lengths from MASK_INDEX (the "ort" pipeline, right padding), or
    # the raw (B, S) 1/0 mask as int32, exact for any padding
    mask_index = None if mask is None else ctx.cast(ctx.value(mask), _INT32)
    w, b = _packed_qkv(ctx, node)
    return ctx.node("Attention", [ctx.value(node.inputs[0]), w, b, mask_index],
                    domain=MS_DOMAIN, num_heads=int(node.attrs["heads"]),
                    scale=float(node.attrs["scale"]))


def _ort_skip_layer_norm(ctx: Emitter, node: Node) -> str:
    rank = len(node.inputs[0].shape)
    if ctx.opset >= 17 or rank not in (2, 3):  # the core form where it exists (see ONNX_OPS)
        return _skip_layer_norm(ctx, node)
    x, skip, weight, beta, bias = ctx.inputs(node)
    if rank == 2:  # packed (T, H): the contrib op takes (B, S, H), so view it as (1, T, H)
        one = ctx.const([0], _INT64)
        x, skip = (ctx.node("Unsqueeze", [v, one]) for v in (x, skip))
    y = ctx.node("SkipLayerNormalization", [x, skip, weight, beta, bias], domain=MS_DOMAIN,
                 epsilon=float(node.attrs["eps"]))
    return y if rank == 3 else ctx.node("Squeeze", [y, ctx.const([0], _INT64)])


def _ort_bias_gelu(ctx: Emitter, node: Node) -> str:
    x, bias = ctx.inputs(node)
    op = "FastGelu" if node.attrs["approximate"] == "tanh" else "BiasGelu"
    return ctx.node(op, [x, bias], domain=MS_DOMAIN)


# Why the `ort` form of SKIP_LAYER_NORM is the core one from opset 17 (LayerNormalization's
# first; below it, the contrib op): ONNX Runtime's CPU SkipLayerNormalization kernel is
# slower than its own Add + LayerNormalization: on (300, 384) rows, one thread, onnxruntime
# 1.32, AMD EPYC (avx512), 590-620 us against 87-127 us. MiniLM on real texts ran 1.08-1.09x
# faster on one thread packed, 1.07-1.08x padded (`tools/bench_layer_norm.py`; on two
# threads, noisier: 0.89-1.06x and 1.05-1.12x).
# ONNX Runtime fuses the core form back into the contrib op on (B, S, H) inputs unless the
# session disables `SkipLayerNormFusion`, which bertrt's CPU sessions do
# (`OrtBackend.disabled_optimizers`); its CUDA sessions keep the fusion.

#: One entry per registry op (checked on import).
ONNX_OPS: dict[Op, OnnxOp] = {
    Op.GATHER: OnnxOp(_gather),
    Op.POSITION_IDS: OnnxOp(_position_ids),
    Op.ADD: OnnxOp(_add),
    Op.SCALE: OnnxOp(_scale),
    Op.LAYER_NORM: OnnxOp(_layer_norm),
    Op.LINEAR: OnnxOp(_linear),
    Op.GELU: OnnxOp(_gelu),
    Op.RELU: OnnxOp(_relu),
    Op.SILU: OnnxOp(_silu),
    Op.TANH: OnnxOp(_tanh),
    Op.DROPOUT: OnnxOp(_identity),
    Op.SOFTMAX: OnnxOp(_softmax),
    Op.MASK_INDEX: OnnxOp(_mask_index),
    Op.SPLIT_HEADS: OnnxOp(_split_heads),
    Op.MERGE_HEADS: OnnxOp(_merge_heads),
    Op.MATMUL: OnnxOp(_matmul),
    Op.SELECT_TOKEN: OnnxOp(_select_token),
    Op.SELECT_LAST: OnnxOp(_select_last),
    Op.GATHER_ROWS: OnnxOp(_gather_rows),
    Op.EMBED_LAYER_NORM: OnnxOp(_embed_layer_norm, _ort_embed_layer_norm),
    Op.SKIP_LAYER_NORM: OnnxOp(_skip_layer_norm, _ort_skip_layer_norm),
    Op.BIAS_GELU: OnnxOp(_bias_gelu, _ort_bias_gelu),
    Op.ATTENTION: OnnxOp(_attention, _ort_attention),
    Op.PACKED_POSITIONS: OnnxOp(_packed_positions),
    Op.FIRST_TOKENS: OnnxOp(_first_tokens),
    Op.PACKED_ATTENTION: OnnxOp(_packed_attention),
}
check_table(ONNX_OPS, "onnx")


# ---------------------------------------------------------------------- the driver
def export(
    graph: Graph,
    weights: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    *,
    flavour: str = "ort",
    fp16: bool = False,
    opset: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    padding: str = "right",
    int8: bool = False,
    calibration: Sequence[np.ndarray] | None = None,
) -> Path:
    """Write `graph` with `weights` as an ONNX inference model at `path`.

    Args:
        graph: An IR graph, as built or fused (`bertrt.graph.passes.fused_copy`).
        weights: float arrays keyed by the graph's parameter names.
        path: The `.onnx` file; written atomically (nothing is left behind on failure). Over
            2 GiB of weights, the tensors go to `<path>.data` beside it.
        flavour: "ort" (ONNX Runtime's com.microsoft fused ops) or "standard" (core ONNX).
        fp16: fp16 weights and activations; LayerNorm and softmax accumulate in fp32 and the
            outputs are fp16. Inputs stay int64.
        opset: The default ONNX opset version (default `DEFAULT_OPSET`).
        metadata: `config` (the config.json dict), `head`, `vocab` (tokens in id order, or a
            token -> id mapping; only its size and sha256 are stored), and any other entries,
            stored as strings (JSON for non-strings).
        padding: "right" (the default, as tokenizers pad): ONNX Runtime's Attention reads
            per-row lengths, its fastest path; "any": it reads the raw 0/1 mask, so left
            padding and masks with holes are exact too. The standard flavour handles any mask.
        int8: Dynamic int8 for the weight products bertrt picks (`bertrt.lower.int8`); not
            with fp16. Its default opset is 20 (ONNX Runtime runs its core `Gelu` fused).
        calibration: For int8: token-id sequences the fp32 model runs to decide which FFN
            down-projections are quantized (None: they all stay fp32).

    Returns:
        The path written.

    Raises:
        BertrtError: an unknown flavour, an opset too old for an op the graph needs, or an
            output folder that is missing or not writable.
    """
    path = Path(path)
    if padding not in ("right", "any"):
        raise BertrtError(f"padding: {padding!r} is unknown; expected 'right' or 'any'")
    if flavour not in FLAVOURS:
        raise BertrtError(f"flavour: {flavour!r} is unknown; expected one of "
                          f"{', '.join(FLAVOURS)}")
    if int8 and fp16:
        raise BertrtError("int8: choose int8 or fp16, not both")
    if int8 and flavour == "ort":
        raise BertrtError("int8: export it with flavour 'standard' (ONNX Runtime's quantizer "
                          "cannot type the ort flavour's contrib ops)")
    opset = _check_opset(INT8_OPSET if int8 and opset is None else opset)
    _check_destination(path)
    _check_weights(graph, weights)
    if graph.by_role(Role.MASKED_POSITIONS) is not None:
        raise BertrtError("graph: the masked-MLM form is for training; export the full "
                          "pretraining graph (build_bert(config, 'pretraining'))")
    ctx = Emitter(graph, weights, flavour, opset, bool(fp16), padding)
    for value in graph.inputs:
        ctx.names[id(value)] = value.name
        ctx.dtypes[value.name] = _ELEM[value.dtype]
    for node in graph.nodes:
        ctx.current = node
        ctx.names[id(node.output)] = ONNX_OPS[node.op](ctx, node)
    ctx.current = None
    model = _assemble(ctx, graph, {**(metadata or {}), **({"int8": "true"} if int8 else {})},
                      fp16)
    if int8:
        from bertrt.lower.int8 import quantize

        model = quantize(model, ctx.origin, calibration)
    _write(model, path)
    return path


def _check_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise BertrtError(f"opset: expected an integer, got {opset!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise BertrtError(f"opset: {opset} is too old; bertrt writes opsets {MIN_OPSET} to "
                          f"{newest}")
    if opset > newest:
        raise BertrtError(f"opset: {opset} is newer than the installed onnx supports "
                          f"(<= {newest})")
    return opset


def _check_destination(path: Path) -> None:
    if path.is_dir():
        raise BertrtError(f"{path}: is a folder; expected the path of a .onnx file")
    folder = path.parent
    if not folder.exists():
        raise BertrtError(f"{folder}: output folder does not exist")
    if not folder.is_dir():
        raise BertrtError(f"{folder}: is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BertrtError(f"{folder}: output folder is not writable")


def _check_weights(graph: Graph, weights: Mapping[str, np.ndarray]) -> None:
    for name, value in graph.params.items():
        if name not in weights:
            raise BertrtError(f"weights: no array for parameter {name}")
        shape = tuple(np.shape(weights[name]))
        if shape != tuple(value.shape):
            raise BertrtError(f"weights: {name} has shape {list(shape)}, the graph expects "
                              f"{list(value.shape)}")


def _value_info(name: str, elem: int, shape: Sequence[Any]) -> onnx.ValueInfoProto:
    dims = [d.name if isinstance(d, SymbolicDim) else int(d) for d in shape]
    return helper.make_tensor_value_info(name, elem, dims)


def _assemble(ctx: Emitter, graph: Graph, metadata: dict[str, Any], fp16: bool) -> onnx.ModelProto:
    produced = {out for n in ctx.nodes for out in n.output}
    # Name each node's result by its IR value, and each graph output by its key.
    rename: dict[str, str] = {}
    extra: list[NodeProto] = []
    for key, value in graph.outputs.items():
        tensor = ctx.names[id(value)]
        if tensor in produced and tensor not in rename:
            rename[tensor] = key
        else:  # an output that is an input, a weight, or another output's tensor
            extra.append(helper.make_node("Identity", [tensor], [key], name=key))
            ctx.dtypes[key] = ctx.dtypes[tensor]
    for node in graph.nodes:
        tensor = ctx.names.get(id(node.output))
        if tensor in produced and tensor not in rename:
            rename[tensor] = ctx.fresh(node.output.name)
    nodes = []
    for proto in [*ctx.nodes, *extra]:
        proto.input[:] = [rename.get(n, n) for n in proto.input]
        proto.output[:] = [rename.get(n, n) for n in proto.output]
        nodes.append(proto)
    dtypes = {rename.get(n, n): t for n, t in ctx.dtypes.items()}
    nodes = _prune(nodes, set(graph.outputs))
    read = {n for proto in nodes for n in proto.input}
    initializers = [t for name, t in ctx.initializers.items() if name in read]

    inputs = [_value_info(v.name, _ELEM[v.dtype], v.shape) for v in graph.inputs]
    outputs = [_value_info(key, dtypes[key], value.shape) for key, value in graph.outputs.items()]
    onnx_graph = helper.make_graph(nodes, graph.name, inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", ctx.opset)]
    if any(n.domain == MS_DOMAIN for n in nodes):
        opsets.append(helper.make_opsetid(MS_DOMAIN, MS_DOMAIN_VERSION))
    version = _version()
    model = helper.make_model(
        onnx_graph, opset_imports=opsets, producer_name="bertrt", producer_version=version,
        ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True),
        doc_string=f"bertrt {graph.name} ({ctx.flavour} flavour{', fp16' if fp16 else ''})",
    )
    props = _metadata(graph, metadata, ctx.flavour, ctx.opset, fp16, version, ctx.padding)
    helper.set_model_props(model, props)
    return model


def _prune(nodes: list[NodeProto], outputs: set[str]) -> list[NodeProto]:
    """Drop nodes nothing reads (the mask bias the contrib Attention replaced, ...)."""
    live = set(outputs)
    kept = []
    for proto in reversed(nodes):
        if any(o in live for o in proto.output):
            kept.append(proto)
            live.update(i for i in proto.input if i)
    return kept[::-1]


def _version() -> str:
    from bertrt import __version__  # torch-free: bertrt imports its model layer lazily

    return __version__


def _metadata(graph: Graph, given: dict[str, Any], flavour: str, opset: int, fp16: bool,
              version: str, padding: str) -> dict[str, str]:
    config = given.pop("config", None) or {}
    head = given.pop("head", None) or graph.metadata.get("head", "none")
    vocab = given.pop("vocab", None)
    present = graph.op_counts()
    counts = {name: present.get(name, 0) for name, op in REGISTRY.items() if op.fused}
    props = {
        "bertrt_version": version,
        "flavour": flavour,
        "fp16": "true" if fp16 else "false",
        "opset": str(opset),
        "padding": "packed" if graph.metadata.get("packed") else padding,
        "head": str(head),
        "config": json.dumps(config, sort_keys=True),
        "fusions": json.dumps(counts, sort_keys=True),
    }
    if vocab is not None:
        props.update(vocab_checksum(vocab))
    if head in ("classification", "token-classification") and config.get("id2label"):
        labels = {str(k): str(v) for k, v in config["id2label"].items()}
        props["id2label"] = json.dumps(dict(sorted(labels.items(), key=lambda kv: int(kv[0]))))
    for key, value in given.items():
        props.setdefault(str(key), value if isinstance(value, str) else json.dumps(value))
    return props


def vocab_checksum(tokens: Sequence[str] | Mapping[str, int]) -> dict[str, str]:
    """`vocab_sha256` (of the tokens as vocab.txt holds them: one per line in id order, UTF-8)
    and `vocab_size`, the metadata that ties a model file to its tokenizer."""
    if isinstance(tokens, Mapping):  # token -> id
        tokens = sorted(tokens, key=tokens.__getitem__)
    text = "".join(f"{t}\n" for t in tokens)
    return {"vocab_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "vocab_size": str(len(tokens))}


def _write(model: onnx.ModelProto, path: Path) -> None:
    """Check, then write atomically: a temp file in the same folder, then `os.replace`."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    try:
        if size <= EXTERNAL_DATA_THRESHOLD:
            data = model.SerializeToString()
            onnx.checker.check_model(data, full_check=True)
            atomic_write_bytes(path, data)
            return
        # Over protobuf's 2 GiB: tensors in `<name>.data`; the checker reads it by path.
        tmpdir = temp_dir(path.parent, prefix=f".{path.name}.")
        try:
            location = path.name + ".data"
            onnx.save_model(model, tmpdir / path.name, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=location,
                            size_threshold=1024)
            onnx.checker.check_model(str(tmpdir / path.name), full_check=True)
            for name in (location, path.name):
                os.chmod(tmpdir / name, file_mode())
            os.replace(tmpdir / location, path.parent / location)
            os.replace(tmpdir / path.name, path)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    except OSError as exc:
        raise BertrtError(f"{path}: cannot write ({exc.strerror or exc})") from None
