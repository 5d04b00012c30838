"""Residual ADD + LAYER_NORM -> SKIP_LAYER_NORM, taking the sub-layer's LINEAR bias.

Pattern: LAYER_NORM(ADD(DROPOUT?(LINEAR(h, W, bias)), skip)), either operand order.
Rewrite: SKIP_LAYER_NORM(LINEAR(h, W), skip, gamma, beta, bias; eps, dropout). When no operand
is a (dropped-out) biased LINEAR read only here, the add and norm still fuse, without a bias.
A LAYER_NORM that does not read an ADD (the MLM transform) is not a near-match.
"""

from __future__ import annotations

from bertrt.graph.ir import Graph
from bertrt.graph.ops import Op
from bertrt.graph.passes.base import P, PassResult, Refuse, V, match, producer, replace_node


def _norm_of_sum(sublayer: P) -> P:
    residual = P(Op.ADD, P(Op.DROPOUT, sublayer, name="dropout", optional=True), V("skip"),
                 name="add", commutative=True, what="the residual sum")
    return P(Op.LAYER_NORM, residual, V("weight"), V("beta"))


WITH_BIAS = _norm_of_sum(P(Op.LINEAR, V("h"), V("w"), V("bias"), name="linear"))
PLAIN = _norm_of_sum(V("x"))


def _match(norm_output) -> dict:
    try:
        return match(WITH_BIAS, norm_output)
    except Refuse:
        return match(PLAIN, norm_output)


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for norm in graph.find(Op.LAYER_NORM):
        add = producer(norm.inputs[0], Op.ADD)
        if add is None:
            continue
        if add.inputs[0].shape != add.inputs[1].shape:
            result.refuse("SKIP_LAYER_NORM", norm, "the add broadcasts")
            continue
        try:
            m = _match(norm.output)
        except Refuse as why:
            result.refuse("SKIP_LAYER_NORM", norm, str(why))
            continue
        linear, dropout = m.get("linear"), m["dropout"]
        x, bias = (m["x"], None) if linear is None else (linear.output, m["bias"])
        if linear is not None:
            linear.set_input(2, None)  # the bias moves into the fused op
        p = dropout.attrs["p"] if dropout is not None else 0.0
        replace_node(graph, norm, Op.SKIP_LAYER_NORM, [x, m["skip"], m["weight"], m["beta"], bias],
                     {"eps": norm.attrs["eps"], "dropout": p})
        result.count("SKIP_LAYER_NORM")
    return result
