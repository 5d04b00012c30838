"""The pass contract, `run(graph) -> PassResult`, and the small matcher fusions are written in.

A fusion describes what it looks for as a pattern of nested `P(op, *inputs)` with `V` leaves
that capture values, then `match(pattern, value)` either returns the captures or raises
`Refuse` with the reason, which the pass records (`bertrt inspect --fused` prints them).
Operand order is handled here once: a commutative pattern tries both orders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bertrt.graph.ir import Graph, Node, Role, Value
from bertrt.graph.ops import Op, as_op


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, counts by what it made, and the reasons
    it refused near-matches (one line each: which node, why)."""

    changed: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        """Record `n` more of `key` (a fused op made, nodes removed, ...); marks a change."""
        self.counts[key] = self.counts.get(key, 0) + n
        self.changed = True

    def refuse(self, fused: str, node: Node, why: str) -> None:
        self.refused.append(f"{fused} at {node.name}: {why}")

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


class Refuse(Exception):  # noqa: N818 (a refusal is a result, not an error)
    """A near-match that must not be rewritten; the message says why."""


# ---------------------------------------------------------------------- patterns
@dataclass(frozen=True)
class V:
    """A leaf: any value (None only if `absent_ok`), captured as `name` when given.

    A name captured twice must bind the same value both times (Q, K and V read one `x`).
    """

    name: str | None = None
    role: Role | None = None
    absent_ok: bool = False
    what: str = ""
    #: The refusal when `name` was already bound to another value.
    differs: str = ""


@dataclass(frozen=True)
class P:
    """A node running `op` whose inputs match `inputs` (a prefix of its slots).

    Args:
        op: The op to match.
        inputs: Patterns for the first inputs (`V()` matches anything).
        name: Capture the node under this name.
        attrs: Attributes that must equal these values.
        commutative: The first two inputs may come in either order.
        optional: The node may be missing: the pattern then matches `inputs[0]` against the
            value itself (an optional DROPOUT in front of something).
        shared: The node's output may have other readers (by default an inner node of a
            pattern must be read only by the pattern, or the rewrite would drop a value
            someone still needs).
        what: How refusals name this part ("the mask ADD", ...).
    """

    op: Op
    inputs: tuple[Any, ...] = ()
    name: str | None = None
    attrs: tuple[tuple[str, Any], ...] = ()
    commutative: bool = False
    optional: bool = False
    shared: bool = False
    what: str = ""

    def __init__(self, op: Op | str, *inputs: Any, name: str | None = None,
                 attrs: dict[str, Any] | None = None, commutative: bool = False,
                 optional: bool = False, shared: bool = False, what: str = "") -> None:
        for key, value in dict(op=as_op(op), inputs=inputs, name=name,
                               attrs=tuple((attrs or {}).items()), commutative=commutative,
                               optional=optional, shared=shared, what=what).items():
            object.__setattr__(self, key, value)


Captures = dict[str, Any]


def match(pattern: P | V, value: Value | None, root: bool = True) -> Captures:
    """Match `pattern` against the subgraph that produces `value`.

    Returns:
        The captures: node names -> `Node` (or None for an absent optional node), leaf names
        -> `Value`.

    Raises:
        Refuse: no match; the message names the first part that failed (for a commutative
            node, the reason of the last order tried).
    """
    captures: Captures = {}
    _match(pattern, value, captures, root)
    return captures


def _bind(captures: Captures, name: str | None, obj: Any, differs: str = "") -> None:
    if name is None:
        return
    if name in captures and captures[name] is not obj:
        raise Refuse(differs or f"{name} is not the same value everywhere")
    captures[name] = obj


def _match(pattern: P | V, value: Value | None, captures: Captures, root: bool) -> None:
    if isinstance(pattern, V):
        if value is None and not pattern.absent_ok:
            raise Refuse(f"{pattern.what or pattern.name or 'an input'} is missing")
        if pattern.role is not None and (value is None or value.role is not pattern.role):
            raise Refuse(f"{pattern.what or pattern.name} is not the {pattern.role}")
        _bind(captures, pattern.name, value, pattern.differs)
        return
    what = pattern.what or pattern.op.value
    node = value.producer if value is not None else None
    if node is None or node.op is not pattern.op:
        if pattern.optional:
            _bind(captures, pattern.name, None)
            _match(pattern.inputs[0], value, captures, root)
            return
        raise Refuse(f"{what} not found")
    for key, want in pattern.attrs:
        if node.attrs.get(key) != want:
            raise Refuse(f"{what} has {key}={node.attrs.get(key)!r}, not {want!r}")
    if not (root or pattern.shared or single_use(node.output)):
        raise Refuse(f"{what} ({node.name}) is read elsewhere")
    orders = [list(node.inputs)]
    if pattern.commutative:
        orders.append([node.inputs[1], node.inputs[0], *node.inputs[2:]])
    failure: Refuse | None = None
    for inputs in orders:
        trial = dict(captures)
        try:
            _bind(trial, pattern.name, node)
            for sub, v in zip(pattern.inputs, inputs + [None] * len(pattern.inputs)):
                _match(sub, v, trial, root=False)
        except Refuse as why:
            failure = why
            continue
        captures.clear()
        captures.update(trial)
        return
    assert failure is not None
    raise failure


# ---------------------------------------------------------------------- graph helpers
def producer(value: Value | None, op: Op | str) -> Node | None:
    """The node that made `value` if it runs `op`, else None (an unknown op is an error)."""
    op = as_op(op)
    if value is None or value.producer is None or value.producer.op is not op:
        return None
    return value.producer


def single_use(value: Value) -> bool:
    """True if exactly one node reads `value` and it is not a graph output."""
    graph = value.producer.graph if value.producer is not None else None
    if graph is not None and any(v is value for v in graph.outputs.values()):
        return False
    return len(value.users) == 1


def replace_node(graph: Graph, old: Node, op: Op, inputs: list[Value | None], attrs: dict,
                 name: str | None = None) -> Node:
    """Insert a node running `op` where `old` stands (in its scope), make `old`'s readers
    read it, and remove `old`. The nodes that fed `old` stay until dead-code removal."""
    index = graph.nodes.index(old)
    new = graph.add_node(op, inputs, attrs, name=name or old.name + "." + op.lower(),
                         index=index, scope=old.scope)
    graph.replace_all_uses(old.output, new.output)
    graph.remove_node(old)
    return new
