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


def _embed_packed(path: Path, rows: list[np.ndarray]) -> np.ndarray:
    """Mean-pooled embeddings of `rows` as the engine batches them: longest first, packed,
    cut by a budget of 2048 real tokens."""
    from bertrt.padding import pack_rows
    from bertrt.serve.engine import token_budget_batches

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    lengths = np.array([len(r) for r in rows])
    order = np.argsort(-lengths, kind="stable")
    out = np.empty((len(rows), 384), np.float32)
    for part in token_budget_batches(lengths[order], 2048, packed=True):
        picked = order[part]
        flat, cu = pack_rows([rows[i] for i in picked])
        hidden = session.run(["last_hidden_state"], {"input_ids": flat, "cu_seqlens": cu,
                                                     "token_type_ids": np.zeros_like(flat)})[0]
        out[picked] = np.add.reduceat(hidden, cu[:-1], axis=0) / np.diff(cu)[:, None]
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_keeps_the_embedding_gate_and_quantizes_every_weight_product(minilm, real_texts,
                                                                          tmp_path):
    fp32 = minilm.export_onnx(tmp_path / "fp32.onnx", flavour="standard")
    int8 = minilm.export_onnx(tmp_path / "int8.onnx", flavour="standard", int8=True)
    graph = onnx.load(str(int8)).graph
    ops = Counter(n.op_type for n in graph.node)
    # per layer: the packed QKV, the attention output, the FFN up- and down-projections; +
    # the pooler; each product with outlier channels gains one small fp32 MatMul beside it
    assert ops["MatMulInteger"] == 4 * 6 + 1
    split = [n for n in graph.node if n.op_type == "MatMul" and n.name.endswith(".fp32")]
    assert ops["MatMul"] == 2 * 6 + len(split)  # + the attention core, fp32
    assert len(split) >= 6  # every down-projection's input has outliers on MiniLM
    enc = minilm.tokenizer(real_texts, max_length=64)
    order = np.argsort(enc["attention_mask"].sum(1))
    cosine = _cosine(_embed(fp32, enc, order), _embed(int8, enc, order))
    assert cosine.min() >= 0.99, (cosine.min(), cosine.mean())
    assert cosine.mean() >= 0.995
    meta = {p.key: p.value for p in onnx.load(str(int8), load_external_data=False).metadata_props}
    assert meta["int8"] == "true"


def test_int8_keeps_the_gate_in_the_engines_packed_batches(minilm, real_texts, tmp_path):
    """The engine's layout: longest first, packed under a token budget, at 128 tokens (each
    batch's dynamic range is set by the texts it holds)."""
    fp32 = minilm.export_onnx(tmp_path / "fp32.onnx", flavour="ort", packed=True)
    int8 = minilm.export_onnx(tmp_path / "int8.onnx", packed=True, int8=True)
    rows = [np.asarray(r) for r in
            minilm.tokenizer(real_texts, max_length=128, padding=False)["input_ids"]]
    cosine = _cosine(_embed_packed(fp32, rows), _embed_packed(int8, rows))
    assert cosine.min() >= 0.99, (cosine.min(), cosine.mean())
    assert cosine.mean() >= 0.995


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


def test_outlier_channels_follow_an_independent_measurement(minilm, minilm_dir, tmp_path):
    """The input channels bertrt computes in fp32 are those whose max |x| over the calibration
    texts exceeds OUTLIER_RATIO x rms of the whole input, measured independently with
    transformers (hooks on every FFN projection's input) on the same texts."""
    import torch
    import transformers

    import bertrt.lower.int8 as int8
    from bertrt.train.corpus import docstring_texts

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    net = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    inputs: dict[str, list[torch.Tensor]] = {}
    for i, layer in enumerate(net.encoder.layer):
        for name, module in ((f"encoder.layer.{i}.intermediate.dense", layer.intermediate.dense),
                             (f"encoder.layer.{i}.output.dense", layer.output.dense)):
            module.register_forward_pre_hook(
                lambda module, args, name=name: inputs.setdefault(name, []).append(
                    args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for text in docstring_texts(int8.CALIBRATION_TEXTS):
            net(**tok(text, truncation=True, max_length=128, return_tensors="pt"))
    expected = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).double()
        ratio = x.abs().amax(0) / x.square().mean().sqrt()
        expected[name] = torch.nonzero(ratio > int8.OUTLIER_RATIO).flatten().tolist()
    assert all(expected[f"encoder.layer.{i}.output.dense"] for i in range(6)), expected
    graph = onnx.load(str(minilm.export_onnx(tmp_path / "q.onnx", int8=True))).graph
    found = {t.name.split("/")[0]: onnx.numpy_helper.to_array(t).tolist()
             for t in graph.initializer if t.name.endswith(".outliers")}
    assert found == {k: v for k, v in expected.items() if v}


def test_without_calibration_the_down_projections_stay_fp32(tmp_path):
    import bertrt

    model = bertrt.Model.from_config(bertrt.BertConfig.preset("tiny", vocab_size=80))
    assert not model.has_tokenizer
    graph = onnx.load(str(model.export_onnx(tmp_path / "q.onnx", int8=True))).graph
    quantized = {n.name.split("/")[0] for n in graph.node if n.op_type == "MatMulInteger"}
    layers = model.config.num_hidden_layers
    assert not any(".output.dense" in n and ".attention." not in n for n in quantized)
    assert sum(".intermediate.dense" in n for n in quantized) == layers
    assert not any(n.name.endswith(".fp32") for n in graph.node)


def test_a_product_with_too_many_outlier_channels_stays_fp32():
    import bertrt.lower.int8 as int8

    ratios = np.full(100, 1.0)
    ratios[[3, 7]] = 1e3
    assert int8.outlier_channels(ratios).tolist() == [3, 7]
    ratios[:10] = 1e3
    assert int8.outlier_channels(ratios) is None


def test_split_outliers_computes_the_same_product():
    """The rewrite alone (before quantization) is exact: ONNX Runtime on both forms."""
    from onnx import TensorProto, helper, numpy_helper

    import bertrt.lower.int8 as int8

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    split = int8.split_outliers(model, {"mm": np.array([2, 11])})
    assert [n.op_type for n in model.graph.node] == ["MatMul"]  # the input is not changed
    assert "w" not in {t.name for t in split.graph.initializer}
    x = rng.standard_normal((5, 16)).astype(np.float32)
    x[:, 2] *= 100
    got = ort.InferenceSession(split.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-3)
