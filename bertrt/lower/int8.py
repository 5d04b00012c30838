"""int8 for CPU: dynamic quantization of the weight matrix products of an exported model.

bertrt decides, from the IR, which ONNX MatMuls become int8 (per-channel int8 weights, int8
activations quantized per call), and ONNX Runtime's quantizer rewrites exactly those
(`DynamicQuantizeLinear` + `MatMulInteger`). What stays fp32, and why:

- the FFN down-projections (the LINEAR that reads the GELU): their inputs have outliers a
  per-tensor int8 range cannot hold; quantizing them costs most of the accuracy (MiniLM's
  mean-pooled embeddings fall from cosine 0.993 to 0.980 at the worst of 500 texts);
- the attention core (Q K^T, probs @ V): activation by activation, and small at BERT's lengths;
- embeddings, LayerNorms, softmax, GELU, and the tied MLM decoder (a Gemm on the word table).

Quantized: the Q/K/V projections, the attention output projections, the FFN up-projections,
the pooler and the heads' own LINEARs. See docs/onnx.md for the measured trade.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import onnx

from bertrt.errors import BertrtError
from bertrt.graph.ir import Node, ValueKind
from bertrt.graph.ops import Op

#: IR ops whose weight products may become int8 (their MatMuls by a constant B).
_PROJECTIONS = (Op.LINEAR, Op.ATTENTION, Op.PACKED_ATTENTION)


def keeps_fp32(node: Node) -> bool:
    """True for an IR node whose weight products stay fp32 (see the module docstring)."""
    if node.op not in _PROJECTIONS:
        return True
    if node.op is Op.LINEAR:
        source = node.inputs[0].producer if node.inputs[0] is not None else None
        if source is not None and source.op in (Op.GELU, Op.BIAS_GELU):
            return True  # the FFN down-projection
        weight = node.inputs[1]
        return weight is None or weight.kind is not ValueKind.PARAM
    return False


def int8_nodes(model: onnx.ModelProto, origin: Mapping[str, Node]) -> list[str]:
    """The ONNX MatMul nodes to quantize: a constant B, emitted for an IR node that
    `keeps_fp32` does not keep (`origin`: ONNX node name -> the IR node it was emitted for)."""
    constants = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in constants and n.name in origin
            and not keeps_fp32(origin[n.name])]


def quantize(model: onnx.ModelProto, origin: Mapping[str, Node]) -> onnx.ModelProto:
    """`model` with the chosen MatMuls as dynamic int8 (per-channel weights)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise BertrtError("int8: needs onnxruntime (pip install 'bertrt[cpu]')") from None
    nodes = int8_nodes(model, origin)
    if not nodes:
        raise BertrtError("int8: the graph has no weight products to quantize")
    with tempfile.TemporaryDirectory(prefix="bertrt-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(out))
