"""Word + token-type + position embeddings, summed, + LAYER_NORM (+ DROPOUT) -> EMBED_LAYER_NORM.

Pattern: LAYER_NORM(a sum of single-use ADDs) whose three terms, in any order and grouping,
are GATHER(word table, input_ids), GATHER(token-type table, token_type_ids) and
GATHER(position table, POSITION_IDS(input_ids)); the tables are told apart by their roles.
"""

from __future__ import annotations

from bertrt.graph.ir import Graph, Node, Role, Value
from bertrt.graph.ops import Op
from bertrt.graph.passes.base import (
    Captures,
    P,
    PassResult,
    Refuse,
    V,
    match,
    producer,
    replace_node,
    single_use,
)

TERMS = {
    "word": P(Op.GATHER, V("word", role=Role.WORD_EMBEDDINGS), V("input_ids")),
    "token type": P(Op.GATHER, V("token_type", role=Role.TOKEN_TYPE_EMBEDDINGS),
                    V("token_type_ids")),
    "position": P(Op.GATHER, V("position", role=Role.POSITION_EMBEDDINGS),
                  P(Op.POSITION_IDS, V("input_ids"))),
}


def _terms(value: Value, top: bool = True) -> list[Value]:
    """The terms of a sum of ADDs (inner partial sums must be read only by the sum)."""
    add = producer(value, Op.ADD)
    if add is None:
        return [value]
    if not top and not single_use(value):
        raise Refuse("a partial sum is read elsewhere")
    return [t for v in add.inputs for t in _terms(v, top=False)]


def _match(norm: Node) -> Captures:
    terms = _terms(norm.inputs[0])
    if len(terms) != 3:
        raise Refuse(f"the sum has {len(terms)} terms, not word + position + token type")
    captures: Captures = {}
    for kind, pattern in TERMS.items():
        for term in terms:
            try:
                found = match(pattern, term, root=False)
            except Refuse:
                continue
            if "input_ids" in captures and found.get("input_ids", captures["input_ids"]) \
                    is not captures["input_ids"]:
                raise Refuse("positions are not those of the word ids")
            captures.update(found)
            terms.remove(term)
            break
        else:
            raise Refuse(f"no {kind} embedding lookup")
    return captures


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for norm in graph.find(Op.LAYER_NORM):
        add = producer(norm.inputs[0], Op.ADD)
        if add is None or not any(producer(v, Op.GATHER) for v in add.inputs):
            continue  # not an embeddings sum: nothing to refuse
        try:
            m = _match(norm)
        except Refuse as why:
            result.refuse("EMBED_LAYER_NORM", norm, str(why))
            continue
        anchor, p = norm, 0.0
        users = norm.output.users
        if len(users) == 1 and users[0][0].op is Op.DROPOUT and single_use(norm.output):
            anchor, p = users[0][0], users[0][0].attrs["p"]
        inputs = [m["input_ids"], m["token_type_ids"], m["word"], m["position"],
                  m["token_type"], norm.inputs[1], norm.inputs[2]]
        attrs = {"eps": norm.attrs["eps"], "dropout": p}
        if anchor is not norm:  # the dropout folds in: its node is replaced, the norm dies
            replace_node(graph, anchor, Op.EMBED_LAYER_NORM, inputs, attrs, name=norm.name)
            graph.remove_node(norm)
        else:
            replace_node(graph, norm, Op.EMBED_LAYER_NORM, inputs, attrs)
        result.count("EMBED_LAYER_NORM")
    return result
