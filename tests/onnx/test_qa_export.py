"""The question-answering head: its start and end logits per token equal transformers'
`BertForQuestionAnswering` on the same weights, saved and loaded either way; and ONNX Runtime's
equal the torch lowering's, padded (both flavours, fused and as built) and packed (per real
token), as do the packed torch lowering's."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import bertrt
from bertrt.padding import length_mask, pack_rows, pad_rows

CFG = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=48, max_position_embeddings=40, type_vocab_size=2,
           layer_norm_eps=1e-6)
SPANS = ("start_logits", "end_logits")
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    model = bertrt.Model.from_config(bertrt.BertConfig(**CFG), head="qa", seed=5)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():  # LayerNorm 1/0 and zero biases would hide bugs
        for t in model.weights.values():
            t.add_(0.2 * torch.randn(t.shape, generator=gen))
    return model


def _batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, CFG["max_position_embeddings"] + 1, n)
    lengths[0] = CFG["max_position_embeddings"]
    rows = [rng.integers(0, CFG["vocab_size"], k) for k in lengths]
    types = [rng.integers(0, 2, k) for k in lengths]
    return rows, types, lengths


def _torch(model, rows, types, lengths):
    ids, types_ = (torch.as_tensor(pad_rows(x)) for x in (rows, types))
    mask = torch.as_tensor(length_mask(lengths).astype(np.int64))
    with torch.no_grad():
        out = model.to_torch()(ids, mask, types_)
    return {k: out[k].numpy() for k in SPANS}, mask.bool().numpy()


def test_graph_has_the_reference_layout(model):
    assert model.head == "question-answering"
    assert "pooler_output" not in model.graph.outputs  # BertForQuestionAnswering has none
    assert sorted(n for n in model.graph.params if not n.startswith("bert.")) == \
        ["qa_outputs.bias", "qa_outputs.weight"]
    assert [tuple(str(d) for d in model.graph.outputs[k].shape) for k in SPANS] == \
        [("batch", "seq")] * 2


@pytest.mark.parametrize("flavour,fuse", [("ort", True), ("ort", False), ("standard", True)])
def test_onnx_padded_equals_torch(model, tmp_path, flavour, fuse):
    path = model.export_onnx(tmp_path / "qa.onnx", flavour=flavour, fuse=fuse)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows, types, lengths = _batch(9, seed=1)
    want, mask = _torch(model, rows, types, lengths)
    feeds = {"input_ids": pad_rows(rows), "attention_mask": length_mask(lengths).astype(np.int64),
             "token_type_ids": pad_rows(types)}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for key in SPANS:
        assert got[key].shape == want[key].shape
        assert np.abs(got[key] - want[key])[mask].max() < TOL, key


@pytest.mark.parametrize("flavour", ["ort", "standard"])
def test_onnx_packed_equals_torch_per_real_token(model, tmp_path, flavour):
    path = model.export_onnx(tmp_path / "qa.onnx", flavour=flavour, packed=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert {o.name: o.shape for o in session.get_outputs() if o.name in SPANS} == \
        {k: ["tokens"] for k in SPANS}
    for n in (1, 8, 33):
        rows, types, lengths = _batch(n, seed=n)
        want, mask = _torch(model, rows, types, lengths)
        flat, cu = pack_rows(rows)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {
            "input_ids": flat, "cu_seqlens": cu, "token_type_ids": np.concatenate(types)})))
        for key in SPANS:
            assert got[key].shape == (int(cu[-1]),)
            assert np.abs(got[key] - want[key][mask]).max() < TOL, key
        with torch.no_grad():
            packed = model.to_torch(packed=True)(torch.as_tensor(flat), torch.as_tensor(cu),
                                                 torch.as_tensor(np.concatenate(types)))
        for key in SPANS:
            assert np.abs(packed[key].numpy() - want[key][mask]).max() < TOL, key


def test_transformers_loads_bertrt_and_bertrt_loads_transformers(model, tmp_path):
    import transformers

    rows, types, lengths = _batch(5, seed=3)
    want, mask = _torch(model, rows, types, lengths)
    inputs = {"input_ids": torch.as_tensor(pad_rows(rows)),
              "attention_mask": torch.as_tensor(length_mask(lengths).astype(np.int64)),
              "token_type_ids": torch.as_tensor(pad_rows(types))}
    model.save(tmp_path / "ours")
    hf = transformers.BertForQuestionAnswering.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = hf(**inputs)
    for key in SPANS:
        assert np.abs(getattr(theirs, key).numpy() - want[key])[mask].max() < TOL, key
    hf.save_pretrained(tmp_path / "theirs")
    back = bertrt.load(tmp_path / "theirs")  # the head is found from the checkpoint
    assert back.head == "question-answering" and not back.fresh_params
    again, _ = _torch(back, rows, types, lengths)
    for key in SPANS:
        assert np.array_equal(again[key][mask], want[key][mask]), key
