"""int8 for CPU: dynamic quantization of the weight matrix products of an exported model.

bertrt decides, from the IR, which ONNX MatMuls become int8 (per-channel int8 weights, int8
activations quantized per call, one range per tensor), and ONNX Runtime's quantizer rewrites
exactly those (`DynamicQuantizeLinear` + `MatMulInteger`).

A per-tensor activation range is ruined by a few *outlier channels*: on MiniLM one or two of
the 1536 GELU outputs every FFN down-projection reads reach 50-90x the rms of the whole input
(the rest stay under ~25x), and one of the 384 LayerNorm outputs each FFN up-projection reads
reaches ~40x. With such a channel in the range, every other value keeps a few levels. So,
given calibration texts, the fp32 model runs them and each product's input channels are
measured: those whose max |x| exceeds `OUTLIER_RATIO` times rms(x) are *split off*
(`split_outliers`, the decomposition of LLM.int8(), with the channels fixed at export):

    X @ W  =  (X * keep) @ W_kept  +  X[:, outliers] @ W[outliers, :]
              ^ int8, its range set by the ordinary channels   ^ fp32, K = a few channels

On MiniLM that splits 1-7 channels of each down-projection and 1-2 of each up-projection, so
every weight product is int8, and the worst mean-pooled cosine to fp32 over 600 real texts
rises from 0.9895 (down-projections kept fp32) to 0.994, at 1.17x the speed (docs/onnx.md).

What stays fp32:

- without calibration texts (a model without a tokenizer), the FFN down-projections (the
  LINEAR that reads the GELU): their outlier channels are not known;
- a product with more than `MAX_OUTLIER_SHARE` of its input channels over the bound;
- the attention core (Q K^T, probs @ V): activation by activation, and small at BERT's lengths;
- embeddings, LayerNorms, softmax, GELU, and the tied MLM decoder (a Gemm on the word table).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bertrt.errors import BertrtError
from bertrt.graph.ir import Node, ValueKind
from bertrt.graph.ops import Op

#: IR ops whose weight products may become int8 (their MatMuls by a constant B).
_PROJECTIONS = (Op.LINEAR, Op.ATTENTION, Op.PACKED_ATTENTION)
#: An input channel whose max |x| over the calibration texts exceeds this many times rms(x)
#: of the whole input is computed in fp32 (on MiniLM: 20 splits 22 channels in all, worst
#: cosine 0.9937-0.9949; 30 splits 11, 0.9932; 12 splits the Q/K/V inputs too, 0.9963 but
#: slower than keeping the down-projections fp32).
OUTLIER_RATIO = 20.0
#: A product with more of its input channels over the bound than this share stays fp32.
MAX_OUTLIER_SHARE = 0.05
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
    docstring); the rest are decided by calibration (`quantize`)."""
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


def channel_ratios(model: onnx.ModelProto, matmuls: Sequence[onnx.NodeProto],
                   sequences: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per input channel of each MatMul, max |x| over `sequences` divided by rms(x) over all
    of the input's values (token ids, run one at a time through the fp32 `model` on ONNX
    Runtime): (K,) by node name."""
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
    peak: dict[str, np.ndarray] = {}
    squares = dict.fromkeys(wanted, 0.0)
    count = dict.fromkeys(wanted, 0)
    for ids in sequences:
        for name, x in zip(wanted, session.run(wanted, _feed(session, ids))):
            x = np.asarray(x, dtype=np.float64)
            x = x.reshape(-1, x.shape[-1])  # (tokens, K)
            top = np.abs(x).max(axis=0, initial=0.0)
            peak[name] = np.maximum(peak[name], top) if name in peak else top
            squares[name] += float(np.square(x).sum())
            count[name] += x.size
    rms = {name: np.sqrt(squares[name] / max(count[name], 1)) for name in wanted}
    return {n.name: peak[n.input[0]] / max(rms[n.input[0]], 1e-12) for n in matmuls}


def outlier_channels(ratios: np.ndarray) -> np.ndarray | None:
    """The channels over `OUTLIER_RATIO` (int64, ascending), or None when there are more than
    `MAX_OUTLIER_SHARE` of them (the product then stays fp32)."""
    channels = np.flatnonzero(ratios > OUTLIER_RATIO)
    if len(channels) > MAX_OUTLIER_SHARE * len(ratios):
        return None
    return channels.astype(np.int64)


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


def split_outliers(model: onnx.ModelProto, splits: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with each MatMul of `splits` (by name; Y = X @ W, W a (K, N) initializer)
    written as `(X * keep) @ W_kept + X[..., channels] @ W[channels]`, W_kept being W with
    the rows of its `channels` zeroed. The first MatMul keeps the node's name (the one to
    quantize); `model` itself is not changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {t.name: t for t in graph.initializer}
    nodes, replaced = [], set()
    for node in graph.node:
        channels = splits.get(node.name)
        if channels is None or not len(channels):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        keep = np.ones(w.shape[0], dtype=w.dtype)
        keep[channels] = 0
        name, x = node.name, node.input[0]
        graph.initializer.extend([
            numpy_helper.from_array(keep, f"{name}.keep"),
            numpy_helper.from_array(w * keep[:, None], f"{name}.kept_weight"),
            numpy_helper.from_array(np.asarray(channels, np.int64), f"{name}.outliers"),
            numpy_helper.from_array(np.ascontiguousarray(w[channels]), f"{name}.outlier_weight"),
        ])
        replaced.add(node.input[1])
        nodes += [
            # (..., K) with the outlier channels zeroed -> (..., N), to be quantized
            helper.make_node("Mul", [x, f"{name}.keep"], [f"{name}.kept_input"],
                             name=f"{name}.mask"),
            helper.make_node("MatMul", [f"{name}.kept_input", f"{name}.kept_weight"],
                             [f"{name}.kept_output"], name=name),
            # (..., K) -> (..., k) the outlier channels -> (..., N), fp32
            helper.make_node("Gather", [x, f"{name}.outliers"], [f"{name}.outlier_input"],
                             axis=-1, name=f"{name}.gather"),
            helper.make_node("MatMul", [f"{name}.outlier_input", f"{name}.outlier_weight"],
                             [f"{name}.outlier_output"], name=f"{name}.fp32"),
            helper.make_node("Add", [f"{name}.kept_output", f"{name}.outlier_output"],
                             [node.output[0]], name=f"{name}.sum"),
        ]
    read = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name not in replaced or t.name in read]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


def plan(model: onnx.ModelProto, origin: Mapping[str, Node],
         calibration: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The ONNX MatMuls to quantize, each with its outlier input channels to split off
    (`split_outliers`; empty: none).

    With `calibration` sequences: every weight product but one with too many outlier
    channels. Without: every weight product but the FFN down-projections, none split."""
    matmuls = weight_matmuls(model, origin)
    none = np.zeros(0, dtype=np.int64)
    if not calibration:
        return {n.name: none for n in matmuls if not is_down_projection(origin[n.name])}
    ratios = channel_ratios(model, matmuls, calibration)
    chosen = {n.name: outlier_channels(ratios[n.name]) for n in matmuls}
    return {name: channels for name, channels in chosen.items() if channels is not None}


def quantize(model: onnx.ModelProto, origin: Mapping[str, Node],
             calibration: Sequence[np.ndarray] | None = None) -> onnx.ModelProto:
    """`model` with the MatMuls `plan` chooses as dynamic int8 (per-channel weights), their
    outlier channels split off in fp32."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise BertrtError("int8: needs onnxruntime (pip install 'bertrt[cpu]')") from None
    chosen = plan(model, origin, calibration)
    if not chosen:
        raise BertrtError("int8: the graph has no weight products to quantize")
    model = split_outliers(model, chosen)
    root = logging.getLogger()
    root.addFilter(_not_preprocessing_advice)
    try:
        with tempfile.TemporaryDirectory(prefix="bertrt-int8-") as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_dynamic(model, out, per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_quantize=list(chosen),
                             extra_options={"MatMulConstBOnly": True})
            return onnx.load(str(out))
    finally:
        root.removeFilter(_not_preprocessing_advice)


def _not_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop the quantizer's advice to run its pre-processing (shape inference and graph
    optimization for static quantization), which a dynamic int8 export has no use for."""
    return "pre-processing before quantization" not in record.getMessage()
