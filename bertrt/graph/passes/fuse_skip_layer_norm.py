"""Residual ADD + LAYER_NORM -> SKIP_LAYER_NORM, taking the sub-layer's LINEAR bias.

Pattern: LAYER_NORM(ADD(a, b)) with a = DROPOUT?(LINEAR(h, W, bias)), either operand order.
Rewrite: SKIP_LAYER_NORM(LINEAR(h, W), b, gamma, beta, bias; eps, dropout). When no operand is
a (dropped-out) biased LINEAR read only here, the add and norm still fuse, without a bias.
"""

from __future__ import annotations

from bertrt.graph.ir import Graph, Node, Value
from bertrt.graph.passes.base import PassResult, producer, replace_node, single_use


def _sublayer(value: Value | None) -> tuple[Node | None, Node | None]:
    """(dropout, linear) feeding `value`, either possibly None."""
    dropout = producer(value, "DROPOUT")
    if dropout is not None and not single_use(dropout.output):
        return None, None
    linear = producer(dropout.inputs[0] if dropout is not None else value, "LINEAR")
    return dropout, linear


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for norm in graph.find("LAYER_NORM"):
        add = producer(norm.inputs[0], "ADD")
        if add is None:
            continue  # not a residual norm (e.g. the MLM transform): nothing to refuse
        if not single_use(add.output):
            result.refused.append(f"SKIP_LAYER_NORM at {norm.name}: the sum is read elsewhere")
            continue
        a, b = add.inputs
        if a is None or b is None or a.shape != b.shape:
            result.refused.append(f"SKIP_LAYER_NORM at {norm.name}: the add broadcasts")
            continue
        for x, skip in ((a, b), (b, a)):
            dropout, linear = _sublayer(x)
            if linear is not None:
                break
        else:
            x, skip = a, b
            dropout = producer(x, "DROPOUT")
            linear = None
        inputs: list[Value | None] = [x, skip, norm.inputs[1], norm.inputs[2], None]
        p = 0.0
        if dropout is not None and single_use(dropout.output):
            p = dropout.attrs["p"]
            inputs[0] = dropout.inputs[0]
        if linear is not None and linear.inputs[2] is not None and single_use(linear.output) \
                and (dropout is None or inputs[0] is linear.output):
            inputs[4] = linear.inputs[2]
            linear.set_input(2, None)  # the bias moves into the fused op
        replace_node(graph, norm, "SKIP_LAYER_NORM", inputs,
                     {"eps": norm.attrs["eps"], "dropout": p})
        result.changed = True
        result.counts["SKIP_LAYER_NORM"] = result.counts.get("SKIP_LAYER_NORM", 0) + 1
    return result
