"""The fusion matcher: operand order, optional nodes, captures bound once, single use, roles."""

from __future__ import annotations

import pytest

from bertrt.graph import BATCH, SEQ, DType, Graph, Op, Role
from bertrt.graph.passes.base import P, PassResult, Refuse, V, match


def _graph():
    g = Graph("m")
    x = g.add_input("x", DType.FLOAT32, (BATCH, SEQ, 4))
    y = g.add_input("y", DType.FLOAT32, (BATCH, SEQ, 4))
    return g, x, y


def test_commutative_patterns_match_either_operand_order():
    g, x, y = _graph()
    relu = g.op(Op.RELU, x, name="relu")
    left, right = g.op(Op.ADD, relu, y), g.op(Op.ADD, y, g.op(Op.RELU, x))
    pattern = P(Op.ADD, P(Op.RELU, V("a"), name="act"), V("skip"), commutative=True)
    for value in (left, right):
        m = match(pattern, value)
        assert m["a"] is x and m["skip"] is y and m["act"].op is Op.RELU
    with pytest.raises(Refuse, match="RELU not found"):
        match(P(Op.ADD, P(Op.RELU, V()), V()), right)  # not commutative: order matters


def test_a_name_captured_twice_must_bind_one_value():
    g, x, y = _graph()
    same, other = g.op(Op.ADD, x, x), g.op(Op.ADD, x, y)
    pattern = P(Op.ADD, V("v"), V("v"))
    assert match(pattern, same)["v"] is x
    with pytest.raises(Refuse, match="v is not the same value everywhere"):
        match(pattern, other)


def test_optional_nodes_and_single_use():
    g, x, _ = _graph()
    inner = g.op(Op.RELU, x, name="inner")
    dropped = g.op(Op.TANH, g.op(Op.DROPOUT, inner, p=0.1))
    plain = g.op(Op.TANH, g.op(Op.RELU, x))
    pattern = P(Op.TANH, P(Op.DROPOUT, P(Op.RELU, V("x")), name="drop", optional=True))
    assert match(pattern, dropped)["drop"].attrs["p"] == 0.1
    assert match(pattern, plain)["drop"] is None
    g.set_output("peek", inner)  # the inner RELU is now read twice
    with pytest.raises(Refuse, match=r"RELU \(inner\) is read elsewhere"):
        match(pattern, dropped)


def test_attributes_and_roles_constrain_a_match():
    g = Graph("r")
    ids = g.add_input("ids", DType.INT64, (BATCH, SEQ), role=Role.INPUT_IDS)
    table = g.add_param("t", (9, 4), ("zeros",), role=Role.POSITION_EMBEDDINGS)
    other = g.add_param("u", (9, 4), ("zeros",))
    word = P(Op.GATHER, V("table", role=Role.WORD_EMBEDDINGS, what="the table"), V())
    with pytest.raises(Refuse, match="the table is not the word_embeddings"):
        match(word, g.op(Op.GATHER, table, ids))
    with pytest.raises(Refuse, match="is not the word_embeddings"):
        match(word, g.op(Op.GATHER, other, ids))
    scaled = g.op(Op.SCALE, g.op(Op.GATHER, table, ids), factor=2.0)
    with pytest.raises(Refuse, match="SCALE has factor=2.0, not 0.5"):
        match(P(Op.SCALE, V(), attrs={"factor": 0.5}), scaled)


def test_pass_result_counts_and_merges():
    a, b = PassResult(), PassResult()
    a.count("ATTENTION")
    a.count("ATTENTION", 2)
    b.count("BIAS_GELU")
    b.refused.append("BIAS_GELU at n: why")
    a.merge(b)
    assert a.changed and a.counts == {"ATTENTION": 3, "BIAS_GELU": 1}
    assert a.refused == ["BIAS_GELU at n: why"]
    assert not PassResult().changed
