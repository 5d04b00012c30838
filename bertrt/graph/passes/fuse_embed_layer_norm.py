"""Word + token-type + position embeddings, summed, + LAYER_NORM (+ DROPOUT) -> EMBED_LAYER_NORM.

Pattern: LAYER_NORM(ADD(ADD(g1, g2), g3)) where the three operands, in any order, are
GATHER(word, input_ids), GATHER(type_table, token_type_ids) and
GATHER(position_table, POSITION_IDS(input_ids)).
"""

from __future__ import annotations

from bertrt.graph.ir import Graph, Node, Value
from bertrt.graph.passes.base import PassResult, producer, replace_node, single_use


def _leaves(value: Value, out: list[Value]) -> bool:
    add = producer(value, "ADD")
    if add is None:
        out.append(value)
        return True
    if not single_use(add.output) and out:
        return False
    return all(v is not None and _leaves(v, out) for v in add.inputs)


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for norm in graph.find("LAYER_NORM"):
        gathers: list[Value] = []
        if producer(norm.inputs[0], "ADD") is None or not _leaves(norm.inputs[0], gathers):
            continue
        nodes = [producer(v, "GATHER") for v in gathers]
        if len(nodes) != 3 or any(n is None for n in nodes):
            if any(n is not None for n in nodes):
                result.refused.append(f"EMBED_LAYER_NORM at {norm.name}: the sum is not three "
                                      "embedding lookups")
            continue
        word = position = token_type = None
        input_ids = token_type_ids = None
        for node in nodes:
            assert node is not None
            pos_ids: Node | None = producer(node.inputs[1], "POSITION_IDS")
            if pos_ids is not None:
                position, ids_of_pos = node, pos_ids.inputs[0]
            elif node.inputs[1] is not None and node.inputs[1].name == "token_type_ids":
                token_type, token_type_ids = node, node.inputs[1]
            else:
                word, input_ids = node, node.inputs[1]
        if word is None or position is None or token_type is None:
            result.refused.append(f"EMBED_LAYER_NORM at {norm.name}: lookups are not word, "
                                  "position and token type")
            continue
        if ids_of_pos is not input_ids:
            result.refused.append(f"EMBED_LAYER_NORM at {norm.name}: positions are not those "
                                  "of the word ids")
            continue
        anchor, p = norm, 0.0
        users = norm.output.users
        if len(users) == 1 and users[0][0].op == "DROPOUT" and single_use(norm.output):
            anchor, p = users[0][0], users[0][0].attrs["p"]
        inputs = [input_ids, token_type_ids, word.inputs[0], position.inputs[0],
                  token_type.inputs[0], norm.inputs[1], norm.inputs[2]]
        if anchor is not norm:  # the dropout folds in: its node is replaced, the norm dies
            replace_node(graph, anchor, "EMBED_LAYER_NORM", inputs,
                         {"eps": norm.attrs["eps"], "dropout": p}, name=norm.name)
            graph.remove_node(norm)
        else:
            replace_node(graph, norm, "EMBED_LAYER_NORM", inputs,
                         {"eps": norm.attrs["eps"], "dropout": p})
        result.changed = True
        result.counts["EMBED_LAYER_NORM"] = result.counts.get("EMBED_LAYER_NORM", 0) + 1
    return result
