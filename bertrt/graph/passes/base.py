"""The pass contract: `run(graph) -> PassResult`, rewriting the graph in place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bertrt.graph.ir import Graph, Node, Value


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, counts by what it made, and the reasons
    it refused near-matches (so a user sees why something did not fuse)."""

    changed: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    def merge(self, other: PassResult) -> None:
        self.changed |= other.changed
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        self.refused.extend(other.refused)


@dataclass(frozen=True)
class Pass:
    """A named rewrite over a graph."""

    name: str
    run: Callable[[Graph], PassResult]
    doc: str = ""


def producer(value: Value | None, op: str) -> Node | None:
    """The node that made `value` if it runs `op`, else None."""
    if value is None or value.producer is None or value.producer.op != op:
        return None
    return value.producer


def single_use(value: Value) -> bool:
    """True if exactly one node reads `value` and it is not a graph output."""
    graph = value.producer.graph if value.producer is not None else None
    if graph is not None and any(v is value for v in graph.outputs.values()):
        return False
    return len(value.users) == 1


def replace_node(graph: Graph, old: Node, op: str, inputs: list[Value | None], attrs: dict,
                 name: str | None = None) -> Node:
    """Insert a node running `op` where `old` stands, make `old`'s readers read it, and
    remove `old`. The nodes that fed `old` stay until dead-code removal."""
    index = graph.nodes.index(old)
    new = graph.add_node(op, inputs, attrs, name=name or old.name + "." + op.lower(),
                         index=index)
    graph.replace_all_uses(old.output, new.output)
    graph.remove_node(old)
    return new
