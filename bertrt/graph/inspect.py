"""Inspecting a graph: a readable listing, a per-node cost table, and Graphviz DOT.

FLOPs count matrix products only (LINEAR, MATMUL, ATTENTION), 2 per multiply-add;
element-wise ops, LayerNorm and softmax count 0 FLOPs — they are memory-bound, and their cost
shows in the bytes column (bytes of each node's output). Parameters are counted once, at the
first node that reads them, so a tied weight (the MLM decoder reads the word embeddings) is
not counted twice.
"""

from __future__ import annotations

import math
from typing import Any

from bertrt.graph.ir import MASKED, Graph, Value, ValueKind, concrete_shape, format_shape
from bertrt.graph.ops import get_op
from bertrt.units import human as _human


def _ref(value: Value | None) -> str:
    if value is None:
        return "_"
    if value.kind is ValueKind.PARAM:
        return f"@{value.name}"
    return f"%{value.name}"


def _attrs(attrs: dict[str, Any]) -> str:
    if not attrs:
        return ""
    parts = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in attrs.items()]
    return " {" + ", ".join(parts) + "}"


def format_listing(graph: Graph) -> str:
    """`print(graph)`: inputs (with roles), parameters (count, and those with a role), one
    line per node under a header for each scope, outputs."""
    lines = [f"graph {graph.name} ("]
    for value in graph.inputs:
        opt = "?" if value.optional else ""
        role = f"  role={value.role}" if value.role is not None else ""
        lines.append(f"  %{value.name}{opt}: {value.type}{role}")
    n_params = sum(math.prod(v.shape) for v in graph.params.values())  # type: ignore[arg-type]
    lines.append(f") params {len(graph.params)} tensors, {n_params:,} values {{")
    for value in graph.params.values():
        if value.role is not None:
            lines.append(f"  @{value.name}: {value.type}  role={value.role}")
    scope: object = object()
    for node in graph.nodes:
        if node.scope != scope:
            scope = node.scope
            lines.append(f"  {scope if scope is not None else '(no scope)'}:")
        outs = ", ".join(f"%{o.name}: {o.type}" for o in node.outputs)
        ins = ", ".join(_ref(v) for v in node.inputs)
        lines.append(f"    {outs} = {node.op}({ins}){_attrs(node.attrs)}")
    outs = ", ".join(f"{k}=%{v.name}" for k, v in graph.outputs.items())
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(lines)


def _sizes(batch: int, seq: int, extra: dict[str, int]) -> dict[str, int]:
    sizes = {"batch": batch, "seq": seq, MASKED.name: batch * seq}
    sizes.update(extra)
    return sizes


def node_stats(graph: Graph, batch: int = 1, seq: int = 128, **extra: int) -> list[dict]:
    """One dict per node: name, op, shape, params, flops, bytes (at batch × seq).

    The `masked` dim (MLM rows) defaults to batch × seq, i.e. the head over every position.
    """
    sizes = _sizes(batch, seq, extra)
    counted: set[str] = set()
    rows = []
    for node in graph.nodes:
        in_shapes = [
            concrete_shape(v.shape, sizes) if v is not None else None for v in node.inputs
        ]
        out = node.output
        out_shape = concrete_shape(out.shape, sizes)
        params = 0
        for v in node.inputs:
            if v is not None and v.kind is ValueKind.PARAM and v.name not in counted:
                counted.add(v.name)
                params += math.prod(v.shape)  # type: ignore[arg-type]
        rows.append(dict(
            name=node.name,
            op=node.op,
            shape=out_shape,
            params=params,
            flops=get_op(node.op).count_flops(in_shapes, out_shape, node.attrs),
            bytes=math.prod(out_shape) * out.dtype.itemsize,
        ))
    return rows


def format_summary(graph: Graph, batch: int = 1, seq: int = 128, **extra: int) -> str:
    """A table of every node with totals; FLOPs count matrix products only (2 per MAC)."""
    rows = node_stats(graph, batch=batch, seq=seq, **extra)
    header = ("node", "op", "output shape", "params", "FLOPs", "bytes")
    table = [header] + [
        (r["name"], r["op"], format_shape(r["shape"]), f"{r['params']:,}", _human(r["flops"]),
         _human(r["bytes"], "B"))
        for r in rows
    ]
    total_params = sum(r["params"] for r in rows)
    total_flops = sum(r["flops"] for r in rows)
    total_bytes = sum(r["bytes"] for r in rows)
    table.append(("total", f"{len(rows)} nodes", "", f"{total_params:,}", _human(total_flops),
                  _human(total_bytes, "B")))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    right = {3, 4, 5}

    def fmt(row: tuple) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [f"{graph.name} at batch={batch}, seq={seq} "
             f"(FLOPs: matrix products only, 2 per multiply-add; bytes: node outputs)",
             fmt(header), rule]
    lines += [fmt(row) for row in table[1:-1]]
    lines += [rule, fmt(table[-1]),
              f"parameter bytes: {_human(total_params * 4, 'B')} (float32)"]
    return "\n".join(lines)


def _dot_id(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped + '"'


def to_dot(graph: Graph) -> str:
    """Graphviz DOT: ops as boxes, graph inputs/outputs as ellipses; params omitted for clarity
    and listed in each node's label count."""
    lines = [f"digraph {_dot_id(graph.name)} {{", "  rankdir=TB;",
             '  node [fontname="Helvetica", fontsize=10];']
    for value in graph.inputs:
        lines.append(f"  {_dot_id('in:' + value.name)} [shape=ellipse, "
                     f"label={_dot_id(value.name + chr(10) + str(value.type))}];")
    for node in graph.nodes:
        n_params = sum(1 for v in node.inputs if v is not None and v.kind is ValueKind.PARAM)
        label = f"{node.op}\n{node.name}\n{format_shape(node.output.shape)}"
        if n_params:
            label += f"\n{n_params} param(s)"
        style = ', style=filled, fillcolor="#ffe9b3"' if get_op(node.op).fused else ""
        lines.append(f"  {_dot_id(node.name)} [shape=box, label={_dot_id(label)}{style}];")
        for v in node.inputs:
            if v is None or v.kind is ValueKind.PARAM:
                continue
            src = "in:" + v.name if v.producer is None else v.producer.name
            lines.append(f"  {_dot_id(src)} -> {_dot_id(node.name)};")
    for key, value in graph.outputs.items():
        lines.append(f"  {_dot_id('out:' + key)} [shape=ellipse, label={_dot_id(key)}];")
        src = "in:" + value.name if value.producer is None else value.producer.name
        lines.append(f"  {_dot_id(src)} -> {_dot_id('out:' + key)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
