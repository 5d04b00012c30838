"""The ONNX Runtime pipeline's mask reduction: every key-mask reader of the (B, S)
`attention_mask` input reads int32 (B,) lengths from one MASK_INDEX node instead.

ONNX Runtime's Attention takes per-row lengths (its `mask_index`) on its fastest path, as its own
optimizer wires it. Lengths equal the mask only for right padding (as the tokenizer pads), so
the pipeline runs this pass only for exports declared right-padded.
"""

from __future__ import annotations

from bertrt.graph.ir import ENCODER, Graph, Role
from bertrt.graph.ops import Op, get_op
from bertrt.graph.passes.base import PassResult


def run(graph: Graph) -> PassResult:
    result = PassResult()
    mask = graph.by_role(Role.ATTENTION_MASK)
    if mask is None:
        return result
    readers = [(n, i) for n, i in mask.users if get_op(n.op).inputs[i] == "key_mask?"]
    if not readers:
        return result
    first = min(graph.nodes.index(n) for n, _ in readers)
    lengths = graph.add_node(Op.MASK_INDEX, [mask], name="encoder.mask_index", index=first,
                             scope=ENCODER).output
    for node, index in readers:
        node.set_input(index, lengths)
    result.count("MASK_INDEX")
    return result
