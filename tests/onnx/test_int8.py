"""int8 export: bertrt picks the weight products to quantize from the IR, and MiniLM's
mean-pooled embeddings of 500 real texts keep cosine >= 0.99 to fp32 at the worst text."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest


def _embed(path: Path, enc: dict, order: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = np.empty((len(order), 384), np.float32)
    for start in range(0, len(order), 50):  # length-sorted batches
        rows = order[start:start + 50]
        mask = enc["attention_mask"][rows]
        width = int(mask.sum(1).max())
        feed = {k: enc[k][rows, :width] for k in ("input_ids", "attention_mask",
                                                  "token_type_ids")}
        hidden = session.run(["last_hidden_state"], feed)[0]
        m = feed["attention_mask"][..., None]
        out[rows] = (hidden * m).sum(1) / m.sum(1)
    return out


def test_int8_keeps_the_embedding_gate_and_quantizes_what_it_says(minilm, real_texts,
                                                                   tmp_path):
    fp32 = minilm.export_onnx(tmp_path / "fp32.onnx", flavour="standard")
    int8 = minilm.export_onnx(tmp_path / "int8.onnx", flavour="standard", int8=True)
    graph = onnx.load(str(int8)).graph
    ops = Counter(n.op_type for n in graph.node)
    # per layer: the packed QKV, the attention output and the FFN up-projection; + the pooler;
    # (every FFN down-projection's input has outliers on MiniLM: none is quantized)
    assert ops["MatMulInteger"] == 3 * 6 + 1
    assert ops["MatMul"] == 6 + 2 * 6  # the down-projections and the attention core stay fp32
    down = {n.name.split(".output.dense")[0] for n in graph.node
            if n.op_type == "MatMulInteger" and ".output.dense" in n.name
            and ".attention.output" not in n.name}
    assert down == set(), down
    enc = minilm.tokenizer(real_texts, max_length=64)
    order = np.argsort(enc["attention_mask"].sum(1))
    a, b = _embed(fp32, enc, order), _embed(int8, enc, order)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.99, (cosine.min(), cosine.mean())
    assert cosine.mean() >= 0.995
    meta = {p.key: p.value for p in onnx.load(str(int8), load_external_data=False).metadata_props}
    assert meta["int8"] == "true"


def test_int8_and_fp16_are_exclusive(minilm, tmp_path):
    import bertrt

    with pytest.raises(bertrt.BertrtError, match="int8 or fp16"):
        minilm.export_onnx(tmp_path / "x.onnx", fp16=True, int8=True)


def test_int8_defaults_to_the_standard_flavour_and_refuses_ort(tmp_path):
    import bertrt

    model = bertrt.Model.from_config(bertrt.BertConfig.preset("tiny", vocab_size=80))
    path = model.export_onnx(tmp_path / "q.onnx", int8=True, packed=True)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert (meta["flavour"], meta["int8"], meta["padding"]) == ("standard", "true", "packed")
    with pytest.raises(bertrt.BertrtError, match="int8: export it with flavour 'standard'"):
        model.export_onnx(tmp_path / "o.onnx", flavour="ort", int8=True)


def test_down_projections_follow_the_outliers_of_their_inputs(minilm, minilm_dir, monkeypatch,
                                                             tmp_path):
    """The layers bertrt quantizes are those whose GELU output, measured independently with
    transformers on the same calibration texts, has max |x| / rms(x) within the bound: none
    at the default bound on MiniLM, layers 4 and 5 at a looser one."""
    import torch
    import transformers

    import bertrt.lower.int8 as int8
    from bertrt.train.corpus import docstring_texts

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    net = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    inputs: dict[int, list[torch.Tensor]] = {}
    for i, layer in enumerate(net.encoder.layer):
        layer.output.dense.register_forward_pre_hook(
            lambda module, args, i=i: inputs.setdefault(i, []).append(args[0].reshape(-1)))
    with torch.no_grad():
        for text in docstring_texts(int8.CALIBRATION_TEXTS):
            net(**tok(text, truncation=True, max_length=128, return_tensors="pt"))
    ratios = {i: float(torch.cat(x).abs().max() / torch.cat(x).double().square().mean().sqrt())
              for i, x in inputs.items()}
    assert min(ratios.values()) > int8.OUTLIER_RATIO  # the default: none on MiniLM
    monkeypatch.setattr(int8, "OUTLIER_RATIO", 40.0)
    expected = {i for i, r in ratios.items() if r <= 40.0}
    assert expected == {4, 5}, ratios
    graph = onnx.load(str(minilm.export_onnx(tmp_path / "q.onnx", int8=True))).graph
    down = {int(n.name.split("encoder.layer.")[1].split(".")[0]) for n in graph.node
            if n.op_type == "MatMulInteger" and ".output.dense" in n.name
            and ".attention.output" not in n.name}
    assert down == expected
