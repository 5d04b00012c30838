"""LINEAR bias + GELU -> LINEAR (no bias) + BIAS_GELU.

Pattern: GELU(LINEAR(x, W, b)) where the LINEAR output is read only by the GELU.
The exact (erf) GELU and the tanh form both fuse; the form travels as `approximate`.
"""

from __future__ import annotations

from bertrt.graph.ir import Graph
from bertrt.graph.ops import Op
from bertrt.graph.passes.base import P, PassResult, Refuse, V, match, replace_node

PATTERN = P(Op.GELU, P(Op.LINEAR, V("x"), V("weight"), V("bias", what="the LINEAR's bias"),
                       name="linear", what="a LINEAR input"))


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for gelu in graph.find(Op.GELU):
        try:
            m = match(PATTERN, gelu.output)
        except Refuse as why:
            result.refuse("BIAS_GELU", gelu, str(why))
            continue
        m["linear"].set_input(2, None)  # the bias moves into the fused op
        replace_node(graph, gelu, Op.BIAS_GELU, [m["linear"].output, m["bias"]],
                     {"approximate": gelu.attrs["approximate"]})
        result.count("BIAS_GELU")
    return result
