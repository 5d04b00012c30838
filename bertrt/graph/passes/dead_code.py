"""Dead-code removal: drop nodes whose outputs nobody reads, and parameters nobody uses."""

from __future__ import annotations

from bertrt.graph.ir import Graph
from bertrt.graph.passes.base import PassResult


def run(graph: Graph) -> PassResult:
    result = PassResult()
    live_outputs = {id(v) for v in graph.outputs.values()}
    removed = True
    while removed:
        removed = False
        for node in reversed(graph.nodes):
            if any(o.users or id(o) in live_outputs for o in node.outputs):
                continue
            graph.remove_node(node)
            result.count("nodes_removed")
            removed = True
    for name in [n for n, v in graph.params.items() if not v.users]:
        graph.remove_param(name)
        result.count("params_removed")
    return result
