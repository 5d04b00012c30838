"""`build_bert(config, head)`: the BERT model as an IR graph, with Hugging Face parameter names.

The graph is built unfused — embeddings sum, per-head attention, residual adds and LayerNorms —
exactly as the reference implementation computes it; fusion passes rewrite a copy of it.
It holds no numbers: parameters carry names, shapes and initialisation rules only.
"""

from __future__ import annotations

import math

from bertrt.config import BertConfig
from bertrt.graph.ir import (
    BATCH,
    EMBEDDINGS,
    HEAD,
    MASKED,
    POOLER,
    SEQ,
    DType,
    Graph,
    Role,
    Scope,
    Value,
)
from bertrt.graph.ops import Op

HEADS = ("none", "pretraining", "classification", "token-classification", "question-answering")
#: Heads that, as in the reference, have no pooler.
POOLERLESS = ("token-classification", "question-answering")

#: The Hugging Face class that holds each head (the `architectures` entry of config.json).
ARCHITECTURES = {
    "none": "BertModel",
    "pretraining": "BertForPreTraining",
    "classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
    "question-answering": "BertForQuestionAnswering",
}

_ONES = ("ones",)
_ZEROS = ("zeros",)

#: `BertConfig.activation` -> (op, attributes).
ACTIVATIONS: dict[str, tuple[Op, dict[str, str]]] = {
    "gelu": (Op.GELU, {"approximate": "none"}),
    "gelu_tanh": (Op.GELU, {"approximate": "tanh"}),
    "relu": (Op.RELU, {}),
    "silu": (Op.SILU, {}),
}


def canonical_head(head: str | None) -> str:
    """Map None/'none' and the accepted spellings to a name in `HEADS`."""
    if head is None:
        return "none"
    name = head.lower().replace("_", "-")
    aliases = {"sequence-classification": "classification", "token": "token-classification",
               "tag": "token-classification", "pretrain": "pretraining",
               "qa": "question-answering"}
    name = aliases.get(name, name)
    if name not in HEADS:
        from bertrt.errors import ConfigError

        raise ConfigError(f"head {head!r} is unknown; expected one of {', '.join(HEADS)}")
    return name


class _Builder:
    """Small helper that names parameters and nodes by their Hugging Face module path."""

    def __init__(self, config: BertConfig, graph: Graph, prefix: str) -> None:
        self.config = config
        self.g = graph
        self.prefix = prefix
        self.normal = ("normal", config.initializer_range)

    def param(self, path: str, shape: tuple[int, ...], init: tuple,
              role: Role | None = None) -> Value:
        return self.g.add_param(self.prefix + path, shape, init, role=role)

    def linear(self, path: str, x: Value, n_in: int, n_out: int) -> Value:
        w = self.param(f"{path}.weight", (n_out, n_in), self.normal)
        b = self.param(f"{path}.bias", (n_out,), _ZEROS)
        return self.g.op(Op.LINEAR, x, w, b, name=self.prefix + path)

    def layer_norm(self, path: str, x: Value) -> Value:
        w = self.param(f"{path}.weight", (self.config.hidden_size,), _ONES)
        b = self.param(f"{path}.bias", (self.config.hidden_size,), _ZEROS)
        return self.g.op(Op.LAYER_NORM, x, w, b, eps=float(self.config.layer_norm_eps),
                         name=self.prefix + path)

    def dropout(self, x: Value, p: float, path: str) -> Value:
        return self.g.op(Op.DROPOUT, x, p=float(p), name=self.prefix + path + ".dropout")

    def activation(self, x: Value, path: str) -> Value:
        op, attrs = ACTIVATIONS[self.config.activation]
        return self.g.op(op, x, name=self.prefix + path, **attrs)


def build_bert(config: BertConfig, head: str | None = None, masked_lm: bool = False) -> Graph:
    """Build the BERT graph for `config` with one of `HEADS`.

    Inputs (with their roles): `input_ids` (batch, seq) int64; `attention_mask` and
    `token_type_ids` (batch, seq) int64, optional (absent: attend everywhere, segment 0).
    Outputs: `last_hidden_state`, `pooler_output` (not for token-classification and
    question-answering, which have no pooler, as in the reference), and the head's logits:
    `logits`; for question-answering `start_logits` and `end_logits` (batch, seq), a score per
    token for the answer span to start (end) there.

    Args:
        config: The model's configuration.
        head: One of `HEADS` (or an alias).
        masked_lm: Pretraining head only: the masked-MLM form, which takes `masked_positions`
            (masked,) int64 flat indices b*seq+s and runs the MLM head on those rows only
            (`prediction_logits` (masked, vocab)); without it the MLM head runs on every
            position ((batch, seq, vocab)), as the reference does.
    """
    head = canonical_head(head)
    if masked_lm and head != "pretraining":
        raise ValueError(f"masked_lm: only the pretraining head has it, not {head!r}")
    cfg = config
    g = Graph(f"bert-{head}{'-masked' if masked_lm else ''}")
    g.metadata.update(head=head, architecture=ARCHITECTURES[head])
    prefix = "" if head == "none" else "bert."
    b = _Builder(cfg, g, prefix)
    H = cfg.hidden_size

    input_ids = g.add_input("input_ids", DType.INT64, (BATCH, SEQ), role=Role.INPUT_IDS)
    attention_mask = g.add_input("attention_mask", DType.INT64, (BATCH, SEQ), optional=True,
                                 role=Role.ATTENTION_MASK)
    token_type_ids = g.add_input("token_type_ids", DType.INT64, (BATCH, SEQ), optional=True,
                                 role=Role.TOKEN_TYPE_IDS)
    masked = None
    if masked_lm:
        masked = g.add_input("masked_positions", DType.INT64, (MASKED,),
                             role=Role.MASKED_POSITIONS)

    with g.scope(EMBEDDINGS):
        word, x = _embeddings(b, input_ids, token_type_ids)
    for i in range(cfg.num_hidden_layers):
        with g.scope(Scope.layer(i)):
            x = _encoder_layer(b, f"encoder.layer.{i}", x, attention_mask)
    g.set_output("last_hidden_state", x)

    pooled = None
    if head not in POOLERLESS:  # as in the reference, the tagger and the QA model have none
        with g.scope(POOLER):
            # Pooler: tanh(W h_[CLS] + b): (B, S, H) -> (B, H)
            first = g.op(Op.SELECT_TOKEN, x, index=0, name=prefix + "pooler.first_token")
            pooled = g.op(Op.TANH, b.linear("pooler.dense", first, H, H),
                          name=prefix + "pooler.act")
        g.set_output("pooler_output", pooled)

    heads = _Builder(cfg, g, "")
    with g.scope(HEAD):
        if head == "pretraining":
            h = x
            if masked is not None:  # (B, S, H) -> (M, H): the masked rows only
                h = g.op(Op.GATHER_ROWS, x, masked, name="cls.predictions.gather")
            # MLM: (..., H) -> (..., V), decoder tied to the word embeddings
            h = heads.linear("cls.predictions.transform.dense", h, H, H)
            h = heads.activation(h, "cls.predictions.transform.act")
            h = heads.layer_norm("cls.predictions.transform.LayerNorm", h)
            bias = heads.param("cls.predictions.bias", (cfg.vocab_size,), _ZEROS)
            logits = g.op(Op.LINEAR, h, word, bias, name="cls.predictions.decoder")
            g.set_output("prediction_logits", logits)
            nsp = heads.linear("cls.seq_relationship", pooled, H, 2)
            g.set_output("seq_relationship_logits", nsp)
        elif head == "classification":
            h = heads.dropout(pooled, cfg.hidden_dropout_prob, "classifier")
            g.set_output("logits", heads.linear("classifier", h, H, cfg.num_labels))
        elif head == "token-classification":
            h = heads.dropout(x, cfg.hidden_dropout_prob, "classifier")
            g.set_output("logits", heads.linear("classifier", h, H, cfg.num_labels))
        elif head == "question-answering":
            # Span head, no dropout (as the reference): (B, S, H) -> (B, S, 2) -> 2 x (B, S)
            spans = heads.linear("qa_outputs", x, H, 2)
            for index, name in enumerate(("start_logits", "end_logits")):
                g.set_output(name, g.op(Op.SELECT_LAST, spans, index=index,
                                        name=f"qa_outputs.{name}"))
    return g


def _embeddings(b: _Builder, input_ids: Value, token_type_ids: Value) -> tuple[Value, Value]:
    """(B, S) ids -> (B, S, H): word + token-type + position lookups, LayerNorm, dropout.
    Returns the word table (the MLM decoder is tied to it) and the embeddings."""
    g, cfg, prefix, H = b.g, b.config, b.prefix, b.config.hidden_size
    word = b.param("embeddings.word_embeddings.weight", (cfg.vocab_size, H), b.normal,
                   role=Role.WORD_EMBEDDINGS)
    position = b.param("embeddings.position_embeddings.weight",
                       (cfg.max_position_embeddings, H), b.normal, role=Role.POSITION_EMBEDDINGS)
    token_type = b.param("embeddings.token_type_embeddings.weight",
                         (cfg.type_vocab_size, H), b.normal, role=Role.TOKEN_TYPE_EMBEDDINGS)
    positions = g.op(Op.POSITION_IDS, input_ids, name=prefix + "embeddings.position_ids")
    x = g.op(Op.GATHER, word, input_ids, name=prefix + "embeddings.word_embeddings")
    x = g.op(Op.ADD, x, g.op(Op.GATHER, token_type, token_type_ids,
                             name=prefix + "embeddings.token_type_embeddings"),
             name=prefix + "embeddings.add_token_type")
    x = g.op(Op.ADD, x, g.op(Op.GATHER, position, positions,
                             name=prefix + "embeddings.position_embeddings"),
             name=prefix + "embeddings.add_position")
    x = b.layer_norm("embeddings.LayerNorm", x)
    return word, b.dropout(x, cfg.hidden_dropout_prob, "embeddings")


def _encoder_layer(b: _Builder, layer: str, x: Value, attention_mask: Value) -> Value:
    """One encoder layer, (B, S, H) -> (B, S, H): self-attention, then feed-forward, each
    with dropout, a residual add and LayerNorm (post-norm, as BERT)."""
    g, cfg, prefix = b.g, b.config, b.prefix
    H, N = cfg.hidden_size, cfg.num_attention_heads
    att = f"{layer}.attention"
    # Self-attention: (B, S, H) -> 3 x (B, N, S, D) -> scores (B, N, S, S) -> (B, S, H)
    q = g.op(Op.SPLIT_HEADS, b.linear(f"{att}.self.query", x, H, H), heads=N,
             name=prefix + f"{att}.self.query_heads")
    k = g.op(Op.SPLIT_HEADS, b.linear(f"{att}.self.key", x, H, H), heads=N,
             name=prefix + f"{att}.self.key_heads")
    v = g.op(Op.SPLIT_HEADS, b.linear(f"{att}.self.value", x, H, H), heads=N,
             name=prefix + f"{att}.self.value_heads")
    scores = g.op(Op.MATMUL, q, k, transpose_b=True, name=prefix + f"{att}.self.scores")
    scores = g.op(Op.SCALE, scores, factor=1.0 / math.sqrt(cfg.head_dim),
                  name=prefix + f"{att}.self.scale")
    probs = g.op(Op.SOFTMAX, scores, attention_mask, axis=-1,
                 name=prefix + f"{att}.self.softmax")
    probs = b.dropout(probs, cfg.attention_probs_dropout_prob, f"{att}.self")
    context = g.op(Op.MATMUL, probs, v, name=prefix + f"{att}.self.context")
    context = g.op(Op.MERGE_HEADS, context, name=prefix + f"{att}.self.merge_heads")
    out = b.linear(f"{att}.output.dense", context, H, H)
    out = b.dropout(out, cfg.hidden_dropout_prob, f"{att}.output")
    out = g.op(Op.ADD, out, x, name=prefix + f"{att}.output.residual")
    x = b.layer_norm(f"{att}.output.LayerNorm", out)
    # Feed-forward: (B, S, H) -> (B, S, I) -> (B, S, H)
    ff = b.linear(f"{layer}.intermediate.dense", x, H, cfg.intermediate_size)
    ff = b.activation(ff, f"{layer}.intermediate.act")
    ff = b.linear(f"{layer}.output.dense", ff, cfg.intermediate_size, H)
    ff = b.dropout(ff, cfg.hidden_dropout_prob, f"{layer}.output")
    ff = g.op(Op.ADD, ff, x, name=prefix + f"{layer}.output.residual")
    return b.layer_norm(f"{layer}.output.LayerNorm", ff)

