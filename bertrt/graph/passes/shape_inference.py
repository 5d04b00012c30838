"""Shape inference: re-run every op's shape rule in order and update the output types.

Inputs may be re-typed (say, a fixed batch) before running it; nothing is executed.
"""

from __future__ import annotations

from bertrt.graph.ir import Graph
from bertrt.graph.ops import get_op
from bertrt.graph.passes.base import PassResult


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for node in graph.nodes:
        types = get_op(node.op).infer(
            [v.type if v is not None else None for v in node.inputs], node.attrs
        )
        for out, t in zip(node.outputs, types):
            if out.type != t:
                out.type = t
                result.count("retyped")
    return result
