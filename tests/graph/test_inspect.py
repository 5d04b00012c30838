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
    cfg = BertConfig.preset("tiny")
    g = build_bert(cfg, "none")
    text = g.summary(batch=2, seq=16)
    lines = text.splitlines()
    assert sum(1 for ln in lines if ln.split() and ln.split()[0] in {n.name for n in g.nodes}) \
        == len(g.nodes)
    total = [ln for ln in lines if ln.startswith("total")][0]
    n_params = sum(v.shape[0] * (v.shape[1] if len(v.shape) > 1 else 1)
                   for v in g.params.values())
    assert f"{n_params:,}" in total
    rows = g.stats(batch=2, seq=16)
    assert sum(r["params"] for r in rows) == n_params
    ln = [r for r in rows if r["name"] == "encoder.layer.0.intermediate.dense"][0]
    assert ln["shape"] == (2, 16, 512) and ln["bytes"] == 2 * 16 * 512 * 4


def test_listing_and_dot():
    g = build_bert(BertConfig.preset("tiny"), "classification")
    listing = str(g)
    assert listing.count("\n") >= len(g.nodes)
    assert ("%bert.encoder.layer.0.intermediate.dense: float32[batch, seq, 512] = "
            "LINEAR(%bert.encoder.layer.0.attention.output.LayerNorm,") in listing
    dot = g.to_dot()
    assert dot.startswith('digraph "bert-classification"')
    edges = re.findall(r"->", dot)
    non_param_inputs = sum(1 for n in g.nodes for v in n.inputs
                           if v is not None and v.kind.value != "param")
    assert len(edges) == non_param_inputs + len(g.outputs)
    assert dot.count("[shape=box") == len(g.nodes)
