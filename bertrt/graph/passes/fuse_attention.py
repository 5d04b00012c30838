"""Q/K/V projections + scaled dot product + additive mask + softmax + context -> ATTENTION.

Pattern (per layer, from the anchor MERGE_HEADS back):

    q = SPLIT_HEADS(LINEAR(x, Wq, bq)); k = ...(Wk, bk); v = ...(Wv, bv)
    p = SOFTMAX(ADD(SCALE(MATMUL(q, k, transpose_b)), mask))     # ADD in either order
    out = MERGE_HEADS(MATMUL(DROPOUT?(p), v))

Rewrite: ATTENTION(x, Wq, bq, Wk, bk, Wv, bv, mask; heads, scale, dropout). The projections
stay three parameters (the torch lowering trains them in place); emitters may pack them.
"""

from __future__ import annotations

from bertrt.graph.ir import Graph, Node, Value
from bertrt.graph.passes.base import PassResult, producer, replace_node, single_use


class _Refuse(Exception):
    pass


def _head(value: Value | None, what: str) -> tuple[Node, Node]:
    split = producer(value, "SPLIT_HEADS")
    if split is None:
        raise _Refuse(f"{what} is not SPLIT_HEADS")
    linear = producer(split.inputs[0], "LINEAR")
    if linear is None or linear.inputs[2] is None:
        raise _Refuse(f"{what} is not a biased LINEAR projection")
    if not single_use(split.output) or not single_use(linear.output):
        raise _Refuse(f"{what} projection is read elsewhere")
    return split, linear


def _match(merge: Node) -> dict:
    context = producer(merge.inputs[0], "MATMUL")
    if context is None or context.attrs["transpose_b"]:
        raise _Refuse("MERGE_HEADS does not read probs @ V")
    probs = context.inputs[0]
    dropout = producer(probs, "DROPOUT")
    p_drop = 0.0
    if dropout is not None:
        p_drop = dropout.attrs["p"]
        probs = dropout.inputs[0]
    softmax = producer(probs, "SOFTMAX")
    if softmax is None or softmax.attrs["axis"] not in (-1, 3):
        raise _Refuse("no softmax over the key axis")
    add = producer(softmax.inputs[0], "ADD")
    mask: Value | None = None
    scores_in = softmax.inputs[0]
    if add is not None:
        for scores_in, mask in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            if producer(scores_in, "SCALE") is not None:
                break
        else:
            raise _Refuse("the mask ADD does not read scaled scores")
    scale = producer(scores_in, "SCALE")
    if scale is None:
        raise _Refuse("scores are not scaled")
    scores = producer(scale.inputs[0], "MATMUL")
    if scores is None or not scores.attrs["transpose_b"]:
        raise _Refuse("no Q @ K^T")
    for node in (context, softmax, scale, scores, add, dropout):
        if node is not None and node is not context and not single_use(node.output):
            raise _Refuse(f"intermediate {node.name} is read elsewhere")
    q_split, q = _head(scores.inputs[0], "Q")
    k_split, k = _head(scores.inputs[1], "K")
    v_split, v = _head(context.inputs[1], "V")
    x = q.inputs[0]
    if k.inputs[0] is not x or v.inputs[0] is not x:
        raise _Refuse("Q, K and V read different inputs")
    heads = q_split.attrs["heads"]
    if k_split.attrs["heads"] != heads or v_split.attrs["heads"] != heads:
        raise _Refuse("Q, K and V split into different head counts")
    return dict(
        inputs=[x, q.inputs[1], q.inputs[2], k.inputs[1], k.inputs[2], v.inputs[1],
                v.inputs[2], mask],
        attrs=dict(heads=heads, scale=scale.attrs["factor"], dropout=p_drop),
    )


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for merge in graph.find("MERGE_HEADS"):
        try:
            match = _match(merge)
        except _Refuse as why:
            result.refused.append(f"ATTENTION at {merge.name}: {why}")
            continue
        name = merge.name.removesuffix(".merge_heads")
        replace_node(graph, merge, "ATTENTION", match["inputs"], match["attrs"], name=name)
        result.changed = True
        result.counts["ATTENTION"] = result.counts.get("ATTENTION", 0) + 1
    return result
