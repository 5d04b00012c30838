"""int8 for CPU: dynamic quantization of the weight matrix products of an exported model.

bertrt decides, from the IR, which ONNX MatMuls become int8 (per-channel int8 weights, int8
activations quantized per call), and ONNX Runtime's quantizer rewrites exactly those
(`DynamicQuantizeLinear` + `MatMulInteger`). What stays fp32, and why:

- the FFN down-projections (the LINEAR that reads the GELU) whose inputs have outliers a
  per-tensor int8 range cannot hold. Which ones is measured: given calibration texts, the
  fp32 model runs them and a down-projection is quantized only when its input's max |x|
  over rms(x) stays within `OUTLIER_RATIO`. On MiniLM the six layers measure 88, 82, 69, 52,
  26 and 31, so all stay fp32: quantized alone, each costs 0.005, 0.001, 0.003, 0.001,
  0.0005 and 0.0002 of the worst cosine of 500 texts (all six: 0.993 to 0.980), and even
  layers 4 and 5 together took the worst text of arrival-order batches of 32 at 256 tokens
  to 0.9899, under the gate (dynamic int8 takes each batch's range, so the batch a text
  shares matters). Without calibration texts every down-projection stays fp32;
- the attention core (Q K^T, probs @ V): activation by activation, and small at BERT's lengths;
- embeddings, LayerNorms, softmax, GELU, and the tied MLM decoder (a Gemm on the word table).

Quantized: the Q/K/V projections, the attention output projections, the FFN up-projections,
the pooler and the heads' own LINEARs. See docs/onnx.md for the measured trade.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bertrt.errors import BertrtError
from bertrt.graph.ir import Node, ValueKind
from bertrt.graph.ops import Op

#: IR ops whose weight products may become int8 (their MatMuls by a constant B).
_PROJECTIONS = (Op.LINEAR, Op.ATTENTION, Op.PACKED_ATTENTION)
#: A down-projection is quantized when max |x| / rms(x) of its input, over the calibration
#: texts, is at most this (the LayerNorm outputs the other quantized products read measure
#: 20-42 on MiniLM; its down-projections' 26 and 31 already cost too much at 40).
OUTLIER_RATIO = 25.0
#: Calibration texts run, one at a time (so no padding enters the statistics).
CALIBRATION_TEXTS = 32


def is_down_projection(node: Node) -> bool:
    """An FFN down-projection: the LINEAR that reads the GELU."""
    if node.op is not Op.LINEAR or node.inputs[0] is None:
        return False
    source = node.inputs[0].producer
    return source is not None and source.op in (Op.GELU, Op.BIAS_GELU)


def keeps_fp32(node: Node) -> bool:
    """True for an IR node whose weight products always stay fp32 (see the module
    docstring); a down-projection is decided by calibration (`quantize`)."""
    if node.op not in _PROJECTIONS:
        return True
    if node.op is Op.LINEAR:
        weight = node.inputs[1]
        return weight is None or weight.kind is not ValueKind.PARAM
    return False


def weight_matmuls(model: onnx.ModelProto, origin: Mapping[str, Node]) -> list[onnx.NodeProto]:
    """The ONNX MatMuls by a constant B emitted for an IR projection `keeps_fp32` lets go
    (`origin`: ONNX node name -> the IR node it was emitted for)."""
    constants = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in constants and n.name in origin
            and not keeps_fp32(origin[n.name])]


def outlier_ratios(model: onnx.ModelProto, matmuls: Sequence[onnx.NodeProto],
                   sequences: Sequence[np.ndarray]) -> dict[str, float]:
    """max |x| / rms(x) of each MatMul's input A over `sequences` (token ids, run one at a
    time through the fp32 `model` on ONNX Runtime), by node name."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = list(dict.fromkeys(n.input[0] for n in matmuls))
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    peak = dict.fromkeys(wanted, 0.0)
    squares = dict.fromkeys(wanted, 0.0)
    count = dict.fromkeys(wanted, 0)
    for ids in sequences:
        for name, x in zip(wanted, session.run(wanted, _feed(session, ids))):
            x = np.asarray(x, dtype=np.float64)
            peak[name] = max(peak[name], float(np.abs(x).max(initial=0.0)))
            squares[name] += float(np.square(x).sum())
            count[name] += x.size
    rms = {name: np.sqrt(squares[name] / max(count[name], 1)) for name in wanted}
    return {n.name: peak[n.input[0]] / max(rms[n.input[0]], 1e-12) for n in matmuls}


def _feed(session: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """One sequence as the model's inputs (padded form (1, L), or packed (L,))."""
    ids = np.asarray(ids, dtype=np.int64)
    names = {i.name: i for i in session.get_inputs()}
    packed = "cu_seqlens" in names
    row = ids if packed else ids[None]
    feed = {"input_ids": row}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(row)
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones_like(row)
    if packed:
        feed["cu_seqlens"] = np.array([0, len(ids)], dtype=np.int32)
    return feed


def int8_nodes(model: onnx.ModelProto, origin: Mapping[str, Node],
               calibration: Sequence[np.ndarray] | None = None) -> list[str]:
    """The ONNX MatMul nodes to quantize: every weight product but the down-projections, and
    those whose input stays within `OUTLIER_RATIO` on the `calibration` sequences (none
    without them)."""
    matmuls = weight_matmuls(model, origin)
    down = [n for n in matmuls if is_down_projection(origin[n.name])]
    chosen = {n.name for n in matmuls if n not in down}
    if calibration and down:
        ratios = outlier_ratios(model, down, calibration)
        chosen |= {name for name, ratio in ratios.items() if ratio <= OUTLIER_RATIO}
    return [n.name for n in matmuls if n.name in chosen]


def quantize(model: onnx.ModelProto, origin: Mapping[str, Node],
             calibration: Sequence[np.ndarray] | None = None) -> onnx.ModelProto:
    """`model` with the chosen MatMuls (`int8_nodes`) as dynamic int8 (per-channel
    weights)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise BertrtError("int8: needs onnxruntime (pip install 'bertrt[cpu]')") from None
    nodes = int8_nodes(model, origin, calibration)
    if not nodes:
        raise BertrtError("int8: the graph has no weight products to quantize")
    with tempfile.TemporaryDirectory(prefix="bertrt-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(out))
