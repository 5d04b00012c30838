"""Q/K/V projections + scaled dot product + masked softmax + context -> ATTENTION.

Pattern (per layer, from the anchor MERGE_HEADS back):

    q = SPLIT_HEADS(LINEAR(x, Wq, bq)); k = ...(Wk, bk); v = ...(Wv, bv)
    p = SOFTMAX(SCALE(MATMUL(q, k, transpose_b)), key_mask?)
    out = MERGE_HEADS(MATMUL(DROPOUT?(p), v))

Rewrite: ATTENTION(x, Wq, bq, Wk, bk, Wv, bv, key_mask; heads, scale, dropout). The projections
stay three parameters (the torch lowering trains them in place); emitters may pack them.
"""

from __future__ import annotations

from bertrt.graph.ir import Graph
from bertrt.graph.ops import Op
from bertrt.graph.passes.base import P, PassResult, Refuse, V, match, replace_node


def _projection(which: str) -> P:
    linear = P(Op.LINEAR, V("x", differs="Q, K and V read different inputs"),
               V(f"{which}_weight"),
               V(f"{which}_bias", what=f"the {which.upper()} projection's bias"),
               what=f"a LINEAR {which.upper()} projection")
    return P(Op.SPLIT_HEADS, linear, name=f"{which}_split", what=f"{which.upper()} heads")


_SCORES = P(Op.MATMUL, _projection("q"), _projection("k"), attrs={"transpose_b": True},
            what="Q @ K^T")
_PROBS = P(Op.SOFTMAX, P(Op.SCALE, _SCORES, name="scale", what="scaled scores"),
           V("mask", absent_ok=True), name="softmax", what="a softmax of scaled scores")
PATTERN = P(Op.MERGE_HEADS, P(Op.MATMUL, P(Op.DROPOUT, _PROBS, name="dropout", optional=True),
                              _projection("v"), attrs={"transpose_b": False},
                              what="probs @ V"))


def _check(m: dict) -> None:
    if m["softmax"].attrs["axis"] not in (-1, 3):
        raise Refuse("the softmax is not over the key axis")
    heads = {m[f"{w}_split"].attrs["heads"] for w in "qkv"}
    if len(heads) != 1:
        raise Refuse("Q, K and V split into different head counts")


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for merge in graph.find(Op.MERGE_HEADS):
        try:
            m = match(PATTERN, merge.output)
            _check(m)
        except Refuse as why:
            result.refuse("ATTENTION", merge, str(why))
            continue
        inputs = [m["x"]] + [m[f"{w}_{p}"] for w in "qkv" for p in ("weight", "bias")]
        dropout = m["dropout"]
        attrs = dict(heads=m["q_split"].attrs["heads"], scale=m["scale"].attrs["factor"],
                     dropout=dropout.attrs["p"] if dropout is not None else 0.0)
        replace_node(graph, merge, Op.ATTENTION, [*inputs, m["mask"]], attrs)
        result.count("ATTENTION")
    return result
