"""Inspection: the FLOPs total equals the analytic count; listing, summary and DOT are sound."""

from __future__ import annotations

import re

from bertrt.config import BertConfig
from bertrt.graph import build_bert


def analytic_flops(L: int, H: int, I: int, S: int, B: int = 1) -> int:  # noqa: E741
    """Matrix products of BERT's encoder + pooler, 2 FLOPs per multiply-add."""
    per_layer = (
        3 * 2 * S * H * H  # Q, K, V projections
        + 2 * S * S * H  # scores Q K^T over all heads
        + 2 * S * S * H  # probs @ V
        + 2 * S * H * H  # attention output projection
        + 2 * 2 * S * H * I  # feed-forward up and down
    )
    pooler = 2 * H * H
    return B * (L * per_layer + pooler)


def test_base_flops_at_seq_128_match_the_analytic_count():
    g = build_bert(BertConfig.preset("base"), "none")
    expected = analytic_flops(L=12, H=768, I=3072, S=128)
    assert expected == 22_348_431_360  # 22.35 GFLOPs, written out for the reader
    assert g.flops(batch=1, seq=128) == expected
    assert g.flops(batch=4, seq=128) == 4 * expected


def test_fused_graph_counts_the_same_flops():
    from bertrt.graph.passes import fused_copy

    g = build_bert(BertConfig.preset("mini"), "none")
    f, _ = fused_copy(g)
    assert f.flops(batch=2, seq=64) == g.flops(batch=2, seq=64)


def test_summary_table_has_every_node_and_totals():
    import transformers

    cfg = BertConfig.preset("tiny")
    g = build_bert(cfg, "none")
    text = g.summary(batch=2, seq=16)
    lines = text.splitlines()
    assert sum(1 for ln in lines if ln.split() and ln.split()[0] in {n.name for n in g.nodes}) \
        == len(g.nodes)
    # the parameter total against the reference implementation's count of the same model
    reference = transformers.BertModel(transformers.BertConfig(**cfg.to_dict()))
    n_params = reference.num_parameters()
    (total,) = [ln for ln in lines if ln.startswith("total")]
    assert total.split()[3] == f"{n_params:,}"
    ln = [r for r in g.stats(batch=2, seq=16)
          if r["name"] == "encoder.layer.0.intermediate.dense"][0]
    assert ln["shape"] == (2, 16, 512) and ln["bytes"] == 2 * 16 * 512 * 4
    assert ln["params"] == 128 * 512 + 512


def test_listing_shows_scopes_and_the_node_lines():
    g = build_bert(BertConfig.preset("tiny"), "classification")
    listing = str(g).splitlines()
    assert listing.index("  layer[0]:") < listing.index(
        "    %bert.encoder.layer.0.intermediate.dense: float32[batch, seq, 512] = "
        "LINEAR(%bert.encoder.layer.0.attention.output.LayerNorm, "
        "@bert.encoder.layer.0.intermediate.dense.weight, "
        "@bert.encoder.layer.0.intermediate.dense.bias)") < listing.index("  layer[1]:")
    assert ("  @bert.embeddings.word_embeddings.weight: float32[30522, 128]  "
            "role=word_embeddings") in listing


def test_dot_edges_of_a_small_graph():
    from bertrt.graph import BATCH, SEQ, DType, Graph

    g = Graph("t")
    x = g.add_input("x", DType.FLOAT32, (BATCH, SEQ, 8))
    w = g.add_param("w", (4, 8), ("normal", 0.02))
    y = g.op("LINEAR", x, w, name="lin")
    g.set_output("z", g.op("ADD", y, g.op("RELU", y, name="act"), name="sum"))
    dot = g.to_dot()
    assert dot.startswith('digraph "t"')
    edges = set(re.findall(r'^  ("[^"]+") -> ("[^"]+");$', dot, flags=re.M))
    assert edges == {('"in:x"', '"lin"'), ('"lin"', '"act"'), ('"lin"', '"sum"'),
                     ('"act"', '"sum"'), ('"sum"', '"out:z"')}
    assert dot.count("[shape=box") == 3
