"""Fusion passes: structure (counts, what is left, refusals with reasons) and numbers (torch
lowering before vs after, forward and gradients)."""

from __future__ import annotations

import pytest
import torch

from bertrt import BertConfig, Model
from bertrt.graph import build_bert
from bertrt.graph.passes import FUSIONS, fuse, fused_copy
from bertrt.lower.to_torch import lower


def _random_model(head: str, act: str, seed: int = 0) -> Model:
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, hidden_act=act, max_position_embeddings=24,
                     type_vocab_size=3, layer_norm_eps=1e-6, num_labels=3)
    model = Model.from_config(cfg, head=head, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t in model.weights.values():  # LayerNorm 1/0 and zero biases would hide bugs
            t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return model


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 11), generator=gen)
    types = torch.randint(0, 3, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    return ids, mask, types


@pytest.mark.parametrize("head", ["none", "pretraining", "classification",
                                  "token-classification"])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_full_pipeline_counts_and_parity(head, act):
    model = _random_model(head, act)
    graph, result = fused_copy(model.graph, "all")
    graph.verify()
    L = model.config.num_hidden_layers
    gelus = L + (1 if head == "pretraining" else 0) if act != "relu" else 0
    expected = {"EMBED_LAYER_NORM": 1, "ATTENTION": L, "SKIP_LAYER_NORM": 2 * L}
    if gelus:
        expected["BIAS_GELU"] = gelus
    assert {k: v for k, v in result.counts.items() if k.isupper()} == expected
    assert result.refused == []
    counts = graph.op_counts()
    for op in ("SOFTMAX", "SPLIT_HEADS", "MERGE_HEADS", "MATMUL", "GELU", "POSITION_IDS"):
        assert op not in counts, op
    assert model.graph.op_counts().get("SOFTMAX") == L  # the model's graph is left as built

    ids, mask, types = _inputs()
    before = lower(model.graph, model.weights).eval()
    after = lower(graph, model.weights).eval()
    with torch.no_grad():
        a = before(ids, mask, types)
        b = after(ids, mask, types)
    keep = mask.bool()
    for key in a:
        x, y = a[key], b[key]
        if x.dim() == 3 and x.shape[:2] == keep.shape:
            x, y = x[keep], y[keep]
        assert (x - y).abs().max() <= 1e-5, key


def test_each_fusion_alone_keeps_gradients():
    model = _random_model("pretraining", "gelu")
    ids, mask, types = _inputs(1)
    ref_net = lower(model.graph, model.weights).eval()
    out = ref_net(ids, mask, types)
    loss = sum(v.float().pow(2).mean() for v in out.values())
    ref_grads = torch.autograd.grad(loss, list(ref_net.parameters()))
    for name in FUSIONS:
        graph = model.graph.copy()
        result = fuse(graph, [name])
        graph.verify()
        assert result.changed, name
        net = lower(graph, model.weights).eval()
        assert [n for n, _ in net.named_parameters()] == [n for n, _ in ref_net.named_parameters()]
        out = net(ids, mask, types)
        loss = sum(v.float().pow(2).mean() for v in out.values())
        grads = torch.autograd.grad(loss, list(net.parameters()))
        for g_ref, g in zip(ref_grads, grads):
            assert torch.allclose(g_ref, g, atol=1e-5, rtol=1e-4), name


def test_dropout_probabilities_travel_into_fused_ops():
    cfg = BertConfig.preset("tiny", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)
    graph, _ = fused_copy(build_bert(cfg, "none"))
    att = graph.find("ATTENTION")[0]
    assert att.attrs["dropout"] == 0.3
    assert {n.attrs["dropout"] for n in graph.find("SKIP_LAYER_NORM")} == {0.2}
    assert graph.find("EMBED_LAYER_NORM")[0].attrs["dropout"] == 0.2


def test_attention_refuses_when_q_k_v_read_different_inputs():
    graph = build_bert(BertConfig.preset("tiny"), "none")
    key = [n for n in graph.nodes if n.name == "encoder.layer.0.attention.self.key"][0]
    other = [n for n in graph.nodes if n.name == "embeddings.add_position"][0]
    key.set_input(0, other.output)  # K now reads the pre-LayerNorm sum
    result = FUSIONS["attention"].run(graph)
    assert result.counts == {"ATTENTION": 1}  # layer 1 still fuses
    assert any("Q, K and V read different inputs" in r for r in result.refused)
    graph.verify()


def test_bias_gelu_refuses_a_linear_read_elsewhere():
    graph = build_bert(BertConfig.preset("tiny"), "none")
    dense = [n for n in graph.nodes if n.name == "encoder.layer.0.intermediate.dense"][0]
    graph.set_output("peek", dense.output)  # a second reader of the pre-activation value
    result = FUSIONS["bias_gelu"].run(graph)
    assert result.counts == {"BIAS_GELU": 1}
    assert any("read elsewhere" in r for r in result.refused)
    graph.verify()


def test_skip_layer_norm_without_a_linear_keeps_no_bias():
    from bertrt.graph import BATCH, SEQ, DType, Graph

    g = Graph("plain")
    a = g.add_input("a", DType.FLOAT32, (BATCH, SEQ, 4))
    b = g.add_input("b", DType.FLOAT32, (BATCH, SEQ, 4))
    w = g.add_param("w", (4,), ("ones",))
    beta = g.add_param("beta", (4,), ("zeros",))
    g.set_output("y", g.op("LAYER_NORM", g.op("ADD", a, b), w, beta, eps=1e-5))
    result = FUSIONS["skip_layer_norm"].run(g)
    assert result.counts == {"SKIP_LAYER_NORM": 1}
    (node,) = g.find("SKIP_LAYER_NORM")
    assert node.inputs[4] is None


# ----------------------------------------------------------------------------- refusals
def _tiny(head: str = "none"):
    return build_bert(BertConfig.preset("tiny"), head)


def _node(graph, name: str):
    (node,) = [n for n in graph.nodes if n.name == name]
    return node


def test_attention_refuses_an_unbiased_projection_and_a_shared_score():
    graph = _tiny()
    _node(graph, "encoder.layer.0.attention.self.value").set_input(2, None)
    graph.remove_param("encoder.layer.0.attention.self.value.bias")
    graph.set_output("peek", _node(graph, "encoder.layer.1.attention.self.scores").output)
    result = FUSIONS["attention"].run(graph)
    assert result.counts == {}
    assert result.refused == [
        "ATTENTION at encoder.layer.0.attention.self.merge_heads: the V projection's bias is "
        "missing",
        "ATTENTION at encoder.layer.1.attention.self.merge_heads: Q @ K^T "
        "(encoder.layer.1.attention.self.scores) is read elsewhere",
    ]
    graph.verify()


def test_embed_layer_norm_refuses_positions_of_other_ids_and_a_missing_lookup():
    from bertrt.graph import Op

    graph = _tiny()
    other = graph.add_input("other_ids", graph.inputs[0].dtype, graph.inputs[0].shape)
    _node(graph, "embeddings.position_ids").set_input(0, other)
    result = FUSIONS["embed_layer_norm"].run(graph)
    assert result.refused == ["EMBED_LAYER_NORM at embeddings.LayerNorm: positions are not "
                              "those of the word ids"]
    assert not graph.find(Op.EMBED_LAYER_NORM)

    graph = _tiny()
    add = _node(graph, "embeddings.add_position")
    graph.replace_all_uses(add.output, add.inputs[0])  # drop the position term
    result = FUSIONS["embed_layer_norm"].run(graph)
    assert result.refused == ["EMBED_LAYER_NORM at embeddings.LayerNorm: the sum has 2 terms, "
                              "not word + position + token type"]


def test_skip_layer_norm_refuses_a_shared_sum_and_a_broadcasting_add():
    from bertrt.graph import BATCH, SEQ, DType, Graph

    graph = _tiny()
    graph.set_output("peek", _node(graph, "encoder.layer.0.output.residual").output)
    result = FUSIONS["skip_layer_norm"].run(graph)
    assert result.counts == {"SKIP_LAYER_NORM": 3}
    assert result.refused == [
        "SKIP_LAYER_NORM at embeddings.LayerNorm: the add broadcasts",  # (B, S, H) + (S, H)
        "SKIP_LAYER_NORM at encoder.layer.0.output.LayerNorm: the residual sum "
        "(encoder.layer.0.output.residual) is read elsewhere"]

    g = Graph("broadcast")
    a = g.add_input("a", DType.FLOAT32, (BATCH, SEQ, 4))
    b = g.add_input("b", DType.FLOAT32, (SEQ, 4))
    w, beta = g.add_param("w", (4,), ("ones",)), g.add_param("beta", (4,), ("zeros",))
    g.set_output("y", g.op("LAYER_NORM", g.op("ADD", a, b), w, beta, name="norm"))
    result = FUSIONS["skip_layer_norm"].run(g)
    assert (result.counts, result.refused) == ({}, ["SKIP_LAYER_NORM at norm: the add "
                                                    "broadcasts"])


def test_bias_gelu_refuses_an_unbiased_linear_and_a_non_linear_input():
    graph = _tiny()
    _node(graph, "encoder.layer.0.intermediate.dense").set_input(2, None)
    act = _node(graph, "encoder.layer.1.intermediate.act")
    act.set_input(0, _node(graph, "encoder.layer.1.attention.output.LayerNorm").output)
    result = FUSIONS["bias_gelu"].run(graph)
    assert result.counts == {}
    assert result.refused == [
        "BIAS_GELU at encoder.layer.0.intermediate.act: the LINEAR's bias is missing",
        "BIAS_GELU at encoder.layer.1.intermediate.act: a LINEAR input not found",
    ]


def test_inspect_fused_prints_each_refusal(monkeypatch):
    from click.testing import CliRunner

    import bertrt.graph.bert
    from bertrt.cli import main

    result = CliRunner().invoke(main, ["inspect", "--preset", "tiny", "--fused"])
    assert result.exit_code == 0, result.output
    assert "all pipeline: EMBED_LAYER_NORM 1, ATTENTION 2, SKIP_LAYER_NORM 4, BIAS_GELU 2" \
        in result.output
    assert result.output.rstrip().endswith("refused: 0")

    build = bertrt.graph.bert.build_bert

    def unbiased_key(config, head=None):  # a graph whose layer-1 key projection has no bias
        graph = build(config, head)
        _node(graph, "encoder.layer.1.attention.self.key").set_input(2, None)
        graph.remove_param("encoder.layer.1.attention.self.key.bias")
        return graph

    monkeypatch.setattr(bertrt.graph.bert, "build_bert", unbiased_key)
    result = CliRunner().invoke(main, ["inspect", "--preset", "tiny", "--fused", "torch"])
    assert result.exit_code == 0, result.output
    assert "torch pipeline: ATTENTION 1:" in result.output
    assert result.output.rstrip().endswith(
        "refused: 1\n  ATTENTION at encoder.layer.1.attention.self.merge_heads: the K "
        "projection's bias is missing")
