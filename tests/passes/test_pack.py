"""Packed (padding-free) execution: every real token's output and every head's output equal the
padded graph's, in torch and in ONNX Runtime (both flavours), for batches of 1 to 64 sequences
of lengths 1..max_position_embeddings; the pass refuses graphs it cannot pack."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import bertrt
from bertrt.graph import Op, Role, build_bert
from bertrt.graph.ir import GraphError
from bertrt.graph.passes import fuse
from bertrt.padding import pack_rows

CFG = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=48, max_position_embeddings=40, type_vocab_size=3,
           layer_norm_eps=1e-6, num_labels=3)
PER_TOKEN = ("last_hidden_state", "logits", "prediction_logits")


def _model(head: str, act: str = "gelu") -> bertrt.Model:
    model = bertrt.Model.from_config(bertrt.BertConfig(hidden_act=act, **CFG), head=head, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # LayerNorm 1/0 and zero biases would hide bugs
        for t in model.weights.values():
            t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return model


def _batch(n: int, seed: int, longest: int = CFG["max_position_embeddings"]):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest + 1, n)
    lengths[0] = longest  # one sequence at the model's maximum
    rows = [rng.integers(0, CFG["vocab_size"], k) for k in lengths]
    types = [rng.integers(0, CFG["type_vocab_size"], k) for k in lengths]
    return rows, types, lengths


def _padded(rows, types, lengths):
    from bertrt.padding import length_mask, pad_rows

    return (torch.as_tensor(pad_rows(rows)), torch.as_tensor(length_mask(lengths).astype(np.int64)),
            torch.as_tensor(pad_rows(types)))


def _compare(padded: dict, packed: dict, mask: np.ndarray, head: str) -> None:
    assert set(padded) == set(packed)
    for key, want in padded.items():
        want, got = np.asarray(want), np.asarray(packed[key])
        if key in PER_TOKEN and not (head == "classification" and key == "logits"):
            want = want[mask]
        assert want.shape == got.shape, key
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=key)


@pytest.mark.parametrize("head", ["none", "pretraining", "classification",
                                  "token-classification"])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_torch_packed_equals_padded(head, n):
    model = _model(head, act="gelu_new" if n == 7 else "gelu")
    rows, types, lengths = _batch(n, seed=n)
    ids, mask, tt = _padded(rows, types, lengths)
    flat, cu = pack_rows(rows)
    with torch.no_grad():
        want = model.to_torch()(ids, mask, tt)
        got = model.to_torch(packed=True)(torch.as_tensor(flat), torch.as_tensor(cu),
                                          torch.as_tensor(np.concatenate(types)))
    _compare({k: v.numpy() for k, v in want.items()}, {k: v.numpy() for k, v in got.items()},
             mask.bool().numpy(), head)


def test_torch_packed_masked_mlm_and_gradients():
    model = _model("pretraining")
    rows, types, lengths = _batch(5, seed=1, longest=12)
    ids, mask, tt = _padded(rows, types, lengths)
    flat, cu = pack_rows(rows)
    real = mask.bool().reshape(-1).nonzero().squeeze(1)  # padded flat index of each token
    pick = torch.tensor([0, 3, 9, len(flat) - 1])
    net, packed = model.to_torch().train(), model.to_torch(packed=True).train()
    torch.manual_seed(0)
    a = net(ids, mask, tt, masked_positions=real[pick])
    torch.manual_seed(0)
    b = packed(torch.as_tensor(flat), torch.as_tensor(cu), torch.as_tensor(np.concatenate(types)),
               masked_positions=pick)
    assert a["prediction_logits"].shape == b["prediction_logits"].shape == (4, CFG["vocab_size"])
    net.eval(), packed.eval()
    a = net(ids, mask, tt, masked_positions=real[pick])
    b = packed(torch.as_tensor(flat), torch.as_tensor(cu), torch.as_tensor(np.concatenate(types)),
               masked_positions=pick)
    assert (a["prediction_logits"] - b["prediction_logits"]).abs().max() < 1e-4
    params = list(net.parameters())  # the same tensors in both modules
    ga = torch.autograd.grad(a["prediction_logits"].square().sum(), params, allow_unused=True)
    gb = torch.autograd.grad(b["prediction_logits"].square().sum(), params, allow_unused=True)
    assert sum(g is not None for g in ga) > 30
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.allclose(x, y, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("flavour", ["ort", "standard"])
@pytest.mark.parametrize("head", ["none", "classification", "token-classification"])
def test_onnx_packed_equals_padded(flavour, head, tmp_path):
    model = _model(head)
    path = model.export_onnx(tmp_path / "p.onnx", flavour=flavour, packed=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "cu_seqlens",
                                                     "token_type_ids"]
    for n in (1, 9, 64):
        rows, types, lengths = _batch(n, seed=10 + n)
        ids, mask, tt = _padded(rows, types, lengths)
        flat, cu = pack_rows(rows)
        with torch.no_grad():
            want = {k: v.numpy() for k, v in model.to_torch()(ids, mask, tt).items()}
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, {"input_ids": flat, "cu_seqlens": cu,
                                                  "token_type_ids": np.concatenate(types)})))
        _compare(want, got, mask.bool().numpy(), head)


def test_packed_graph_structure():
    graph = build_bert(bertrt.BertConfig(**CFG), "classification")
    result = fuse(graph, "packed")
    graph.verify()
    assert result.counts["PACKED_ATTENTION"] == 2 and result.counts["FIRST_TOKENS"] == 1
    assert graph.by_role(Role.ATTENTION_MASK) is None
    cu = graph.by_role(Role.CU_SEQLENS)
    assert [v.name for v in graph.inputs] == ["input_ids", "cu_seqlens", "token_type_ids"]
    assert str(cu.type) == "int32[batch_plus_1]"
    assert str(graph.outputs["last_hidden_state"].type) == "float32[tokens, 32]"
    assert str(graph.outputs["logits"].type) == "float32[batch, 3]"
    assert not any(n.op in (Op.SPLIT_HEADS, Op.SOFTMAX, Op.ATTENTION) for n in graph.nodes)


def test_pack_refuses_unfused_attention_and_fused_embeddings():
    graph = build_bert(bertrt.BertConfig(**CFG), "none")
    with pytest.raises(GraphError, match=r"SPLIT_HEADS\) needs the padded layout"):
        fuse(graph, ["pack"])
    graph = build_bert(bertrt.BertConfig(**CFG), "none")
    with pytest.raises(GraphError, match=r"EMBED_LAYER_NORM\) needs the padded layout"):
        fuse(graph, ["attention", "embed_layer_norm", "pack"])


def test_packed_module_refuses_bad_offsets():
    net = _model("none").to_torch(packed=True)
    ids = torch.tensor([5, 6, 7])
    for cu in ([0, 2], [1, 3], [0, 2, 2, 3]):
        with pytest.raises(bertrt.BertrtError, match="cu_seqlens"):
            net(ids, torch.tensor(cu))


@pytest.mark.parametrize("flavour", ["ort", "standard"])
def test_onnx_packed_attention_runs_on_views_grouped_by_length(flavour, tmp_path):
    """The attention core pads each sequence within its own view of similar lengths (more than
    half the longest, more than a quarter, the rest), not to the batch's longest: the first
    layer's score tensors have the views' shapes. An empty view and any order stay exact."""
    from bertrt.lower.to_onnx import ATTENTION_VIEWS

    assert ATTENTION_VIEWS == 3
    model = _model("none")
    path = model.export_onnx(tmp_path / "p.onnx", flavour=flavour, packed=True)
    proto = onnx.load(str(path))
    softmax = [n.output[0] for n in proto.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == ATTENTION_VIEWS * CFG["num_hidden_layers"]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                 None)
                              for name in softmax[:ATTENTION_VIEWS])
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    heads = CFG["num_attention_heads"]
    rng = np.random.default_rng(5)
    cases = {  # lengths -> each view's (sequences, padded length)
        (3, 40, 21, 10, 2, 20): [(2, 40), (1, 20), (3, 10)],  # half and a quarter go down
        (40, 3, 2): [(1, 40), (0, 1), (2, 3)],  # nothing between 10 and 20: an empty view
        (7,): [(1, 7), (0, 1), (0, 1)],
    }
    for lengths, views in cases.items():
        rows = [rng.integers(0, CFG["vocab_size"], k) for k in lengths]
        types = [rng.integers(0, CFG["type_vocab_size"], k) for k in lengths]
        ids, mask, tt = _padded(rows, types, np.asarray(lengths))
        flat, cu = pack_rows(rows)
        got = session.run(None, {"input_ids": flat, "cu_seqlens": cu,
                                 "token_type_ids": np.concatenate(types)})
        assert [s.shape for s in got[-ATTENTION_VIEWS:]] == [(b, heads, s, s) for b, s in views]
        with torch.no_grad():
            want = model.to_torch()(ids, mask, tt)["last_hidden_state"].numpy()
        np.testing.assert_allclose(got[0], want[mask.bool().numpy()], atol=1e-4, rtol=0)
