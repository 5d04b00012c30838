"""Padding-free (packed) execution: the graph's token-wise work runs over real tokens only.

The batch arrives as one row of T = sum(lengths) tokens: `input_ids` and `token_type_ids`
(T,), and `cu_seqlens` (B+1,) int32, the cumulative lengths (0, len0, len0+len1, ..., T), as
varlen attention kernels take them. Every op that works token by token (lookups, LINEAR,
GELU, LayerNorm, residual adds, the heads) is unchanged — shape inference retypes it from
(B, S, ...) to (T, ...) — and only three ops see sequence boundaries:

    POSITION_IDS(input_ids)       -> PACKED_POSITIONS(cu_seqlens, input_ids)  positions restart
    ATTENTION(x, W..., key_mask?) -> PACKED_ATTENTION(x, W..., cu_seqlens)    per-sequence keys
    SELECT_TOKEN(x, index=0)      -> FIRST_TOKENS(x, cu_seqlens)              each [CLS]

There is no attention mask: every token is real. Outputs per token become (T, ...), pooled
outputs stay (B, ...). Run after the attention fusion and before the embeddings fusion (whose
op computes positions 0..S-1 itself).
"""

from __future__ import annotations

from bertrt.graph.ir import BOUNDS, TOKENS, DType, Graph, GraphError, Role, TensorType
from bertrt.graph.ops import Op, get_op
from bertrt.graph.passes import dead_code
from bertrt.graph.passes.base import PassResult, replace_node

#: Ops that need the (B, S) layout: the packed graph must have none of them.
_PADDED_ONLY = (Op.SPLIT_HEADS, Op.MERGE_HEADS, Op.SOFTMAX, Op.MATMUL, Op.MASK_INDEX,
                Op.EMBED_LAYER_NORM, Op.ATTENTION)


def run(graph: Graph) -> PassResult:
    result = PassResult()
    if graph.by_role(Role.CU_SEQLENS) is not None:
        return result  # already packed
    result.merge(dead_code.run(graph))  # what earlier fusions orphaned goes first
    blocking = [n for n in graph.nodes
                if n.op in (Op.SPLIT_HEADS, Op.SOFTMAX, Op.EMBED_LAYER_NORM, Op.MASK_INDEX)]
    if blocking:
        node = blocking[0]
        raise GraphError(f"pack: {node.name} ({node.op}) needs the padded layout; run the "
                         "attention fusion first and the embeddings fusion after packing")
    ids = graph.by_role(Role.INPUT_IDS)
    if ids is None:
        raise GraphError("pack: the graph has no input with role input_ids")
    cu = graph.add_input("cu_seqlens", DType.INT32, (BOUNDS,), role=Role.CU_SEQLENS)
    graph.inputs.remove(cu)
    graph.inputs.insert(graph.inputs.index(ids) + 1, cu)
    for role in (Role.INPUT_IDS, Role.TOKEN_TYPE_IDS):
        value = graph.by_role(role)
        if value is not None:
            value.type = TensorType(value.dtype, (TOKENS,))
    # In order, so each node's inputs are already retyped: rewrite the three, re-infer the rest.
    for node in list(graph.nodes):
        if node.op not in (Op.POSITION_IDS, Op.ATTENTION, Op.SELECT_TOKEN):
            types = get_op(node.op).infer([v.type if v is not None else None
                                           for v in node.inputs], node.attrs)
            for out, t in zip(node.outputs, types):
                out.type = t
        elif node.op is Op.POSITION_IDS:
            replace_node(graph, node, Op.PACKED_POSITIONS, [cu, node.inputs[0]], {})
            result.count("PACKED_POSITIONS")
        elif node.op is Op.ATTENTION:
            replace_node(graph, node, Op.PACKED_ATTENTION, [*node.inputs[:7], cu],
                         dict(node.attrs), name=node.name + ".packed")
            result.count("PACKED_ATTENTION")
        elif node.op is Op.SELECT_TOKEN:
            if node.attrs["index"] != 0:
                raise GraphError(f"pack: {node.name} selects token {node.attrs['index']}; "
                                 "packed graphs pool the first token only")
            replace_node(graph, node, Op.FIRST_TOKENS, [node.inputs[0], cu], {})
            result.count("FIRST_TOKENS")
    mask = graph.by_role(Role.ATTENTION_MASK)
    if mask is not None:
        graph.remove_input(mask)
    left = [n for n in graph.nodes if n.op in _PADDED_ONLY]
    if left:
        raise GraphError(f"pack: {left[0].name} ({left[0].op}) still needs the padded layout")
    graph.metadata["packed"] = True
    return result
