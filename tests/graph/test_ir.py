"""The IR keeps its own links, refuses illegal states, and verify() catches broken invariants."""

from __future__ import annotations

import pytest

from bertrt.config import BertConfig
from bertrt.graph import BATCH, SEQ, DType, Graph, GraphError, build_bert
from bertrt.graph.bert import HEADS
from bertrt.graph.ir import EMBEDDINGS, HEAD, MASKED, Role, Scope
from bertrt.graph.passes import SHAPE_INFERENCE


def small_graph() -> Graph:
    g = Graph("t")
    x = g.add_input("x", DType.FLOAT32, (BATCH, SEQ, 8))
    w = g.add_param("w", (4, 8), ("normal", 0.02))
    b = g.add_param("b", (4,), ("zeros",))
    y = g.op("LINEAR", x, w, b, name="lin")
    z = g.op("RELU", y, name="act")
    g.set_output("z", z)
    return g


def test_use_def_links_are_kept_by_the_ir():
    g = small_graph()
    lin, act = g.nodes
    assert g.input("x").users == ((lin, 0),)
    assert g.params["w"].users == ((lin, 1),)
    assert lin.output.users == ((act, 0),)
    assert lin.output.shape == (BATCH, SEQ, 4)
    g.verify()


def test_set_input_rewires_both_user_lists():
    g = small_graph()
    lin, act = g.nodes
    act.set_input(0, g.input("x"))
    assert lin.output.users == ()
    assert (act, 0) in g.input("x").users
    with pytest.raises(GraphError, match="shape rule"):
        g.verify()  # act's recorded output type is stale: it now reads x (width 8)
    SHAPE_INFERENCE.run(g)
    g.remove_node(lin)
    with pytest.raises(GraphError, match="never used"):
        g.verify()  # w and b lost their only user


def test_cannot_remove_a_node_with_users():
    g = small_graph()
    with pytest.raises(GraphError, match="still has users"):
        g.remove_node(g.nodes[0])


def test_shape_rules_reject_bad_inputs():
    g = Graph("bad")
    x = g.add_input("x", DType.FLOAT32, (BATCH, SEQ, 8))
    w = g.add_param("w", (4, 7), ("normal", 0.02))
    with pytest.raises(GraphError, match="LINEAR"):
        g.op("LINEAR", x, w)
    ids = g.add_input("ids", DType.INT64, (BATCH, SEQ))
    with pytest.raises(GraphError, match="ADD: dtypes differ"):
        g.op("ADD", x, ids)
    with pytest.raises(GraphError, match="unknown op"):
        g.op("CONV", x)
    with pytest.raises(GraphError, match="unknown attribute"):
        g.op("RELU", x, slope=0.1)
    with pytest.raises(GraphError, match="RELU: takes at most 1 inputs"):
        g.op("RELU", x, x)


def test_names_are_single_assignment():
    g = Graph("ssa")
    g.add_input("x", DType.FLOAT32, (BATCH, 4))
    with pytest.raises(GraphError, match="already used"):
        g.add_param("x", (4,), ("zeros",))


def test_verify_catches_out_of_order_nodes():
    g = small_graph()
    g.nodes.reverse()
    with pytest.raises(GraphError, match="before it is defined"):
        g.verify()
    g.sort()
    g.verify()


def test_verify_catches_wrong_recorded_shapes():
    g = small_graph()
    from bertrt.graph.ir import TensorType

    g.nodes[0].output.type = TensorType(DType.FLOAT32, (BATCH, SEQ, 5))
    with pytest.raises(GraphError, match="shape rule"):
        g.verify()
    result = SHAPE_INFERENCE.run(g)  # shape inference repairs it without executing anything
    assert result.changed and result.counts["retyped"] >= 1
    g.verify()


@pytest.mark.parametrize("head", HEADS)
def test_bert_graph_verifies_and_copies(head):
    cfg = BertConfig.preset("tiny", num_labels=3)
    g = build_bert(cfg, head)
    g.verify()
    c = g.copy()
    c.verify()
    assert str(c) == str(g)
    assert c.nodes[0] is not g.nodes[0]
    assert set(c.params) == set(g.params)


def test_bert_graph_uses_hugging_face_names_and_ties_the_decoder():
    g = build_bert(BertConfig.preset("tiny"), "pretraining")
    for name in ("bert.embeddings.word_embeddings.weight",
                 "bert.encoder.layer.1.attention.self.query.weight",
                 "bert.pooler.dense.bias", "cls.predictions.transform.dense.weight",
                 "cls.predictions.transform.LayerNorm.weight", "cls.predictions.bias",
                 "cls.seq_relationship.weight"):
        assert name in g.params
    assert "cls.predictions.decoder.weight" not in g.params
    word = g.params["bert.embeddings.word_embeddings.weight"]
    readers = {node.name for node, _ in word.users}
    assert readers == {"bert.embeddings.word_embeddings", "cls.predictions.decoder"}
    assert set(g.outputs) == {"last_hidden_state", "pooler_output", "prediction_logits",
                              "seq_relationship_logits"}
    assert g.by_role(Role.MASKED_POSITIONS) is None  # the full form: MLM on every position
    assert g.outputs["prediction_logits"].shape == (BATCH, SEQ, 30522)
    masked = build_bert(BertConfig.preset("tiny"), "pretraining", masked_lm=True)
    positions = masked.by_role(Role.MASKED_POSITIONS)
    assert positions.name == "masked_positions" and not positions.optional
    assert masked.outputs["prediction_logits"].shape == (MASKED, 30522)
    assert list(masked.params) == list(g.params)  # one set of weights serves both forms


def test_bert_graph_carries_roles_and_scopes():
    cfg = BertConfig.preset("tiny")
    g = build_bert(cfg, "classification")
    roles = {v.role: v.name for v in [*g.inputs, *g.params.values()] if v.role is not None}
    assert roles == {
        Role.INPUT_IDS: "input_ids", Role.ATTENTION_MASK: "attention_mask",
        Role.TOKEN_TYPE_IDS: "token_type_ids",
        Role.WORD_EMBEDDINGS: "bert.embeddings.word_embeddings.weight",
        Role.POSITION_EMBEDDINGS: "bert.embeddings.position_embeddings.weight",
        Role.TOKEN_TYPE_EMBEDDINGS: "bert.embeddings.token_type_embeddings.weight",
    }
    by_scope: dict[str, int] = {}
    for node in g.nodes:
        by_scope[str(node.scope)] = by_scope.get(str(node.scope), 0) + 1
    # embeddings: position ids, 3 lookups, 2 adds, LayerNorm, dropout; a layer: 3 projections,
    # 3 splits, scores, scale, softmax, dropout, context, merge, dense, dropout, add, norm,
    # dense, act, dense, dropout, add, norm (22); pooler: select, dense, tanh; head: dropout,
    # linear
    assert by_scope == {"embeddings": 8, "layer[0]": 22, "layer[1]": 22, "pooler": 3,
                        "head": 2}
    listing = str(g)
    assert "  %input_ids: int64[batch, seq]  role=input_ids" in listing
    assert "  layer[1]:" in listing and "  head:" in listing
    assert g.scope_of(g.params["classifier.weight"]) == HEAD
    assert g.scope_of(g.params["bert.embeddings.word_embeddings.weight"]) == EMBEDDINGS


def test_roles_are_unique_and_scopes_are_known():
    g = Graph("g")
    g.add_input("ids", DType.INT64, (BATCH, SEQ), role=Role.INPUT_IDS)
    with pytest.raises(GraphError, match="role input_ids is already taken"):
        g.add_input("ids2", DType.INT64, (BATCH, SEQ), role=Role.INPUT_IDS)
    with pytest.raises(GraphError, match="kind must be one of"), g.scope(Scope("decoder")):
        pass


def test_copy_keeps_roles_and_scopes():
    g = build_bert(BertConfig.preset("tiny"), "none")
    c = g.copy()
    assert [n.scope for n in c.nodes] == [n.scope for n in g.nodes]
    assert c.by_role(Role.POSITION_EMBEDDINGS).name == g.by_role(Role.POSITION_EMBEDDINGS).name


def test_heads_have_the_reference_parameter_sets():
    cfg = BertConfig.preset("tiny", num_labels=5)
    none = build_bert(cfg, "none")
    assert all(not n.startswith("bert.") for n in none.params)
    tok = build_bert(cfg, "token-classification")
    assert not any("pooler" in n for n in tok.params)
    assert tok.outputs["logits"].shape == (BATCH, SEQ, 5)
    cls = build_bert(cfg, "classification")
    assert cls.outputs["logits"].shape == (BATCH, 5)
