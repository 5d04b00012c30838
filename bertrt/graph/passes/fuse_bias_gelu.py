"""LINEAR bias + GELU -> LINEAR (no bias) + BIAS_GELU.

Pattern: GELU(LINEAR(x, W, b)) where the LINEAR output is read only by the GELU.
The exact (erf) GELU and the tanh form both fuse; the form travels as `approximate`.
"""

from __future__ import annotations

from bertrt.graph.ir import Graph
from bertrt.graph.passes.base import PassResult, producer, replace_node, single_use


def run(graph: Graph) -> PassResult:
    result = PassResult()
    for gelu in graph.find("GELU"):
        linear = producer(gelu.inputs[0], "LINEAR")
        if linear is None:
            result.refused.append(f"BIAS_GELU at {gelu.name}: input is not a LINEAR")
            continue
        bias = linear.inputs[2]
        if bias is None:
            result.refused.append(f"BIAS_GELU at {gelu.name}: the LINEAR has no bias")
            continue
        if not single_use(linear.output):
            result.refused.append(f"BIAS_GELU at {gelu.name}: the LINEAR output is read "
                                  "elsewhere")
            continue
        linear.set_input(2, None)  # the bias moves into the fused op
        replace_node(graph, gelu, "BIAS_GELU", [linear.output, bias],
                     {"approximate": gelu.attrs["approximate"]})
        result.changed = True
        result.counts["BIAS_GELU"] = result.counts.get("BIAS_GELU", 0) + 1
    return result
