"""The bertrt IR: a graph of `Node`s connected by `Value`s, with symbolic dims.

The IR keeps its own use-def links: a `Node` creates its output `Value`s and registers itself as
a user of each input, so rewrites never maintain edge lists by hand. A node that still has users
cannot be removed. Parameters are `Value`s without a producer that carry a Hugging Face name and
an initialisation rule, never data: numbers live with the model's weights, outside the IR.

This module imports neither torch nor onnx.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from bertrt.graph.ops import Op


class SymbolicDim:
    """A named dimension whose size is known only at run time (`batch`, `seq`, ...)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not name.isidentifier():
            raise ValueError(f"symbolic dim name must be an identifier, got {name!r}")
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SymbolicDim) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("SymbolicDim", self.name))

    def __repr__(self) -> str:
        return self.name


Dim = int | SymbolicDim
Shape = tuple[Dim, ...]

BATCH = SymbolicDim("batch")
SEQ = SymbolicDim("seq")
#: Number of masked positions gathered for the MLM head (all of batch × seq when not given).
MASKED = SymbolicDim("masked")
#: Packed execution: real tokens of the whole batch (the sum of the lengths), and the
#: batch + 1 entries of the cumulative lengths.
TOKENS = SymbolicDim("tokens")
BOUNDS = SymbolicDim("batch_plus_1")


class DType(enum.Enum):
    """Element types; the value is (name, bytes per element)."""

    FLOAT32 = ("float32", 4)
    FLOAT16 = ("float16", 2)
    BFLOAT16 = ("bfloat16", 2)
    INT64 = ("int64", 8)
    INT32 = ("int32", 4)
    BOOL = ("bool", 1)

    @property
    def itemsize(self) -> int:
        return self.value[1]

    @property
    def is_float(self) -> bool:
        return self in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16)

    def __repr__(self) -> str:
        return self.value[0]

    __str__ = __repr__


class ValueKind(enum.Enum):
    INPUT = "input"  # a graph input, fed by the caller
    PARAM = "param"  # a named parameter (weights live outside the IR)
    NODE = "node"  # the output of a node


class Role(enum.StrEnum):
    """What a graph input or parameter *is*, so passes and lowerings never read names."""

    INPUT_IDS = "input_ids"  # (batch, seq) token ids
    ATTENTION_MASK = "attention_mask"  # (batch, seq) 1 where a key is attended, 0 where padded
    TOKEN_TYPE_IDS = "token_type_ids"  # (batch, seq) segment ids
    MASKED_POSITIONS = "masked_positions"  # (masked,) flat indices b*seq+s of the MLM rows
    CU_SEQLENS = "cu_seqlens"  # packed: (batch+1,) int32 cumulative lengths, 0 first
    WORD_EMBEDDINGS = "word_embeddings"  # (vocab, hidden) table
    POSITION_EMBEDDINGS = "position_embeddings"  # (max_positions, hidden) table
    TOKEN_TYPE_EMBEDDINGS = "token_type_embeddings"  # (type_vocab, hidden) table


class Scope(NamedTuple):
    """Where in the model a node sits: `embeddings`, `layer[i]`, `pooler` or `head`.

    Set by the builder (`with graph.scope(...)`), kept by passes (a rewrite takes the scope of
    the node it replaces), shown by `print(graph)`; the torch lowering checkpoints by layer.
    """

    kind: str
    index: int | None = None

    @classmethod
    def layer(cls, index: int) -> Scope:
        return cls("layer", index)

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}[{self.index}]"


SCOPE_KINDS = ("embeddings", "encoder", "layer", "pooler", "head")
EMBEDDINGS = Scope("embeddings")
ENCODER = Scope("encoder")  # encoder-wide work outside any one layer (say, the mask's lengths)
POOLER = Scope("pooler")
HEAD = Scope("head")


class TensorType:
    """The static type of a value: dtype and shape (ints and symbolic dims)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: DType, shape: Sequence[Dim]) -> None:
        self.dtype = dtype
        self.shape: Shape = tuple(shape)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TensorType)
            and other.dtype == self.dtype
            and other.shape == self.shape
        )

    def __repr__(self) -> str:
        return f"{self.dtype}{format_shape(self.shape)}"


def format_shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def concrete_shape(shape: Shape, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Bind symbolic dims by name (e.g. {"batch": 8, "seq": 128})."""
    out = []
    for d in shape:
        if isinstance(d, SymbolicDim):
            if d.name not in sizes:
                raise KeyError(f"no size given for symbolic dim {d.name!r}")
            out.append(sizes[d.name])
        else:
            out.append(d)
    return tuple(out)


class Value:
    """An SSA value: a graph input, a parameter, or one output of one node.

    `users` is maintained by `Node`; never edit it directly.
    """

    __slots__ = ("name", "type", "kind", "producer", "index", "_users", "init", "optional",
                 "role")

    def __init__(
        self,
        name: str,
        type: TensorType,
        kind: ValueKind,
        producer: Node | None = None,
        index: int = 0,
        init: tuple[Any, ...] | None = None,
        optional: bool = False,
        role: Role | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.kind = kind
        self.producer = producer
        self.index = index
        self._users: list[tuple[Node, int]] = []
        #: For parameters: how to initialise, e.g. ("normal", 0.02), ("ones",), ("zeros",).
        self.init = init
        #: For graph inputs: the caller may omit it (the lowering supplies the default).
        self.optional = optional
        #: For graph inputs and parameters: what the value is (None: nothing special).
        self.role = role

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def shape(self) -> Shape:
        return self.type.shape

    @property
    def users(self) -> tuple[tuple[Node, int], ...]:
        """(node, input index) pairs that read this value."""
        return tuple(self._users)

    def __repr__(self) -> str:
        role = f" ({self.role})" if self.role is not None else ""
        return f"%{self.name}: {self.type}{role}"


class Node:
    """One operation. Creates its outputs and registers itself as a user of its inputs."""

    __slots__ = ("name", "op", "attrs", "_inputs", "_outputs", "graph", "scope")

    def __init__(
        self,
        graph: Graph,
        op: Op,
        inputs: Sequence[Value | None],
        attrs: Mapping[str, Any],
        output_types: Sequence[TensorType],
        name: str,
        output_names: Sequence[str],
        scope: Scope | None = None,
    ) -> None:
        self.graph = graph
        self.name = name
        self.op = op
        self.scope = scope
        self.attrs = dict(attrs)
        self._inputs: list[Value | None] = list(inputs)
        for i, value in enumerate(self._inputs):
            if value is not None:
                value._users.append((self, i))
        self._outputs = tuple(
            Value(out_name, t, ValueKind.NODE, producer=self, index=i)
            for i, (out_name, t) in enumerate(zip(output_names, output_types))
        )

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return self._outputs

    @property
    def output(self) -> Value:
        """The single output (ops in bertrt have one)."""
        (out,) = self._outputs
        return out

    def set_input(self, index: int, value: Value | None) -> None:
        """Rewire one input, keeping both values' user lists exact."""
        old = self._inputs[index]
        if old is not None:
            old._users.remove((self, index))
        self._inputs[index] = value
        if value is not None:
            value._users.append((self, index))

    def _detach(self) -> None:
        for i, value in enumerate(self._inputs):
            if value is not None:
                value._users.remove((self, i))
        self._inputs = [None] * len(self._inputs)

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op})"


class GraphError(ValueError):
    """The graph breaks an IR invariant (raised by `verify` and by illegal rewrites)."""


class Graph:
    """A BERT model as a DAG of ops over symbolic shapes.

    Build with `add_input`, `add_param`, `op` and `set_output`; nodes are kept in topological
    order (a node can only read values that already exist).
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: dict[str, Value] = {}
        self.metadata: dict[str, Any] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()
        self._scope: Scope | None = None

    # ------------------------------------------------------------------ building
    def _fresh(self, hint: str) -> str:
        if hint not in self._names:
            self._names.add(hint)
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    def _check_role(self, role: Role | None, name: str) -> None:
        if role is not None and self.by_role(role) is not None:
            raise GraphError(f"{name!r}: role {role} is already taken in graph {self.name!r}")

    def add_input(
        self, name: str, dtype: DType, shape: Sequence[Dim], optional: bool = False,
        role: Role | None = None,
    ) -> Value:
        if name in self._names:
            raise GraphError(f"name {name!r} is already used in graph {self.name!r}")
        self._check_role(role, name)
        self._names.add(name)
        value = Value(name, TensorType(dtype, shape), ValueKind.INPUT, optional=optional,
                      role=role)
        self.inputs.append(value)
        return value

    def add_param(
        self,
        name: str,
        shape: Sequence[int],
        init: tuple[Any, ...],
        dtype: DType = DType.FLOAT32,
        role: Role | None = None,
    ) -> Value:
        if name in self._names:
            raise GraphError(f"name {name!r} is already used in graph {self.name!r}")
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise GraphError(f"parameter {name!r} needs a static positive shape, got {shape}")
        self._check_role(role, name)
        self._names.add(name)
        value = Value(name, TensorType(dtype, shape), ValueKind.PARAM, init=tuple(init),
                      role=role)
        self.params[name] = value
        return value

    @contextlib.contextmanager
    def scope(self, scope: Scope) -> Iterator[Scope]:
        """Nodes created inside `with graph.scope(s):` get scope `s`."""
        if scope.kind not in SCOPE_KINDS:
            raise GraphError(f"scope {scope}: kind must be one of {', '.join(SCOPE_KINDS)}")
        outer, self._scope = self._scope, scope
        try:
            yield scope
        finally:
            self._scope = outer

    def op(
        self,
        op: Op | str,
        *inputs: Value | None,
        name: str | None = None,
        **attrs: Any,
    ) -> Value:
        """Append a node running registry op `op`; returns its (single) output."""
        return self.add_node(op, inputs, attrs, name=name).output

    def add_node(
        self,
        op: Op | str,
        inputs: Sequence[Value | None],
        attrs: Mapping[str, Any] | None = None,
        name: str | None = None,
        index: int | None = None,
        scope: Scope | None = None,
    ) -> Node:
        """Create a node (shape rule from the op registry) at the end or at position `index`,
        in `scope` (default: the enclosing `with graph.scope(...)`, if any)."""
        from bertrt.graph.ops import get_op

        opdef = get_op(op)
        op = opdef.name
        if len(inputs) > len(opdef.inputs):
            raise GraphError(f"{op}: takes at most {len(opdef.inputs)} inputs "
                             f"({', '.join(opdef.inputs)}), got {len(inputs)}")
        full_attrs = opdef.bind_attrs(attrs or {})
        for value in inputs:
            if value is not None and value not in self._owned_values():
                raise GraphError(f"{op}: input {value.name!r} does not belong to this graph")
        output_types = opdef.infer([v.type if v is not None else None for v in inputs], full_attrs)
        node_name = self._fresh(name or op.lower())
        out_names = [node_name] if len(output_types) == 1 else [
            self._fresh(f"{node_name}.{i}") for i in range(len(output_types))
        ]
        node = Node(self, op, inputs, full_attrs, output_types, node_name, out_names,
                    scope=scope if scope is not None else self._scope)
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    def _owned_values(self) -> _OwnedValues:
        return _OwnedValues(self)

    def set_output(self, name: str, value: Value) -> None:
        self.outputs[name] = value

    # ------------------------------------------------------------------ rewriting
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every reader of `old` (nodes and graph outputs) read `new`."""
        for node, index in old.users:
            node.set_input(index, new)
        for key, value in list(self.outputs.items()):
            if value is old:
                self.outputs[key] = new

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs nobody reads."""
        for out in node.outputs:
            if out.users or any(v is out for v in self.outputs.values()):
                raise GraphError(
                    f"cannot remove {node.name} ({node.op}): output {out.name!r} still has users"
                )
        node._detach()
        self.nodes.remove(node)

    def remove_input(self, value: Value) -> None:
        """Remove a graph input nobody reads."""
        if value.users:
            raise GraphError(f"cannot remove input {value.name!r}: it still has users")
        self.inputs.remove(value)

    def remove_param(self, name: str) -> None:
        value = self.params[name]
        if value.users:
            raise GraphError(f"cannot remove parameter {name!r}: it still has users")
        del self.params[name]

    def sort(self) -> None:
        """Re-establish topological order (after a rewrite inserted nodes out of order)."""
        placed: set[int] = set()
        order: list[Node] = []
        remaining = list(self.nodes)
        producers = {id(n) for n in self.nodes}
        while remaining:
            progress = []
            for node in remaining:
                deps = [
                    v.producer for v in node.inputs if v is not None and v.producer is not None
                ]
                if all(id(d) in placed or id(d) not in producers for d in deps):
                    progress.append(node)
            if not progress:
                raise GraphError(f"graph {self.name!r} has a cycle")
            for node in progress:
                placed.add(id(node))
                order.append(node)
            ids = {id(n) for n in progress}
            remaining = [n for n in remaining if id(n) not in ids]
        self.nodes = order

    # ------------------------------------------------------------------ queries
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.params.values()
        for node in self.nodes:
            yield from node.outputs

    def input(self, name: str) -> Value:
        for value in self.inputs:
            if value.name == name:
                return value
        raise KeyError(name)

    def by_role(self, role: Role) -> Value | None:
        """The graph input or parameter with this role, or None."""
        for value in itertools.chain(self.inputs, self.params.values()):
            if value.role is role:
                return value
        return None

    def scope_of(self, value: Value) -> Scope | None:
        """The scope of a value: its producer's, or for an input or parameter the scope of
        the first node that reads it (a tied table belongs to where it is first read)."""
        if value.producer is not None:
            return value.producer.scope
        readers = {id(n) for n, _ in value.users}
        return next((n.scope for n in self.nodes if id(n) in readers), None)

    def find(self, op: Op | str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    # ------------------------------------------------------------------ checks
    def verify(self) -> None:
        """Check the IR invariants; raise `GraphError` naming the first broken one.

        SSA (one definition per name), topological order, user lists that match the inputs,
        types that match each op's shape rule, every parameter used, outputs defined.
        """
        from bertrt.graph.ops import get_op

        seen: set[int] = set()
        names: set[str] = set()
        for value in itertools.chain(self.inputs, self.params.values()):
            if value.name in names:
                raise GraphError(f"value name {value.name!r} is defined twice")
            names.add(value.name)
            seen.add(id(value))
        expected_users: dict[int, list[tuple[Node, int]]] = {}
        for node in self.nodes:
            if node.graph is not self:
                raise GraphError(f"{node.name} belongs to another graph")
            opdef = get_op(node.op)
            for i, value in enumerate(node.inputs):
                if value is None:
                    if i < len(opdef.inputs) and not opdef.inputs[i].endswith("?"):
                        raise GraphError(f"{node.name} ({node.op}): input {i} is missing")
                    continue
                if id(value) not in seen:
                    raise GraphError(
                        f"{node.name} ({node.op}) reads {value.name!r} before it is defined "
                        "(not in topological order, or from another graph)"
                    )
                expected_users.setdefault(id(value), []).append((node, i))
            types = opdef.infer([v.type if v is not None else None for v in node.inputs],
                                node.attrs)
            if [o.type for o in node.outputs] != list(types):
                raise GraphError(
                    f"{node.name} ({node.op}): output types {[o.type for o in node.outputs]} "
                    f"differ from the shape rule's {list(types)}"
                )
            for out in node.outputs:
                if out.name in names:
                    raise GraphError(f"value name {out.name!r} is defined twice")
                if out.producer is not node:
                    raise GraphError(f"{out.name!r} does not point back to its producer")
                names.add(out.name)
                seen.add(id(out))
        for value in self.values():
            want = sorted((id(n), i) for n, i in expected_users.get(id(value), []))
            have = sorted((id(n), i) for n, i in value._users)
            if want != have:
                raise GraphError(f"user list of {value.name!r} does not match the graph's edges")
        for name, value in self.params.items():
            if not value.users:
                raise GraphError(f"parameter {name!r} is never used")
        for key, value in self.outputs.items():
            if id(value) not in seen:
                raise GraphError(f"output {key!r} reads {value.name!r}, which is not defined")
        if not self.outputs:
            raise GraphError(f"graph {self.name!r} has no outputs")

    # ------------------------------------------------------------------ copying
    def copy(self) -> Graph:
        """A deep copy of the structure (parameters keep their names; no data is copied)."""
        new = Graph(self.name)
        new.metadata = dict(self.metadata)
        mapping: dict[int, Value] = {}
        for value in self.inputs:
            mapping[id(value)] = new.add_input(
                value.name, value.dtype, value.shape, optional=value.optional, role=value.role
            )
        for name, value in self.params.items():
            mapping[id(value)] = new.add_param(name, value.shape, value.init, value.dtype,
                                               role=value.role)
        for node in self.nodes:
            ins = [mapping[id(v)] if v is not None else None for v in node.inputs]
            new._names.add(node.name)
            out_names = [o.name for o in node.outputs]
            copy = Node(new, node.op, ins, node.attrs, [o.type for o in node.outputs],
                        node.name, out_names, scope=node.scope)
            new._names.update(out_names)
            new.nodes.append(copy)
            for old, fresh in zip(node.outputs, copy.outputs):
                mapping[id(old)] = fresh
        for key, value in self.outputs.items():
            new.outputs[key] = mapping[id(value)]
        return new

    # ------------------------------------------------------------------ display
    def __str__(self) -> str:
        from bertrt.graph.inspect import format_listing

        return format_listing(self)

    def __repr__(self) -> str:
        return (
            f"Graph({self.name!r}, {len(self.nodes)} nodes, {len(self.params)} params, "
            f"outputs={list(self.outputs)})"
        )

    def summary(self, batch: int = 1, seq: int = 128, **sizes: int) -> str:
        """Per-node table (op, output shape, params, FLOPs, bytes) with totals."""
        from bertrt.graph.inspect import format_summary

        return format_summary(self, batch=batch, seq=seq, **sizes)

    def stats(self, batch: int = 1, seq: int = 128, **sizes: int) -> list[dict[str, Any]]:
        """The rows of `summary` as dicts (for programs)."""
        from bertrt.graph.inspect import node_stats

        return node_stats(self, batch=batch, seq=seq, **sizes)

    def flops(self, batch: int = 1, seq: int = 128, **sizes: int) -> int:
        """Total FLOPs (2 per multiply-add, matrix products only) at this batch × seq."""
        return sum(row["flops"] for row in self.stats(batch=batch, seq=seq, **sizes))

    def to_dot(self) -> str:
        """Graphviz DOT text of the graph."""
        from bertrt.graph.inspect import to_dot

        return to_dot(self)


class _OwnedValues:
    """Membership test for 'this value belongs to this graph' without building a set each time."""

    __slots__ = ("graph",)

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, Value):
            return False
        if value.producer is not None:
            return value.producer.graph is self.graph
        if value.kind is ValueKind.PARAM:
            return self.graph.params.get(value.name) is value
        return any(v is value for v in self.graph.inputs)
