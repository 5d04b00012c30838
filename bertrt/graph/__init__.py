"""The bertrt IR: graph, op registry, the BERT builder and passes."""

from bertrt.graph.bert import HEADS, build_bert
from bertrt.graph.ir import (
    BATCH,
    MASKED,
    SEQ,
    DType,
    Graph,
    GraphError,
    Node,
    Role,
    Scope,
    SymbolicDim,
    TensorType,
    Value,
    ValueKind,
)
from bertrt.graph.ops import REGISTRY, Op, OpDef, get_op

__all__ = [
    "BATCH", "MASKED", "SEQ", "DType", "Graph", "GraphError", "HEADS", "Node", "Op", "OpDef",
    "REGISTRY", "Role", "Scope", "SymbolicDim", "TensorType", "Value", "ValueKind",
    "build_bert", "get_op",
]
