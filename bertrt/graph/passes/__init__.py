"""Graph passes. Every pass has one contract: `run(graph) -> PassResult(changed, counts)`.

The fusion pipeline, in order (each a file: pattern, check, rewrite):

- embed_layer_norm: word + position + token-type lookups, sum, LayerNorm -> EMBED_LAYER_NORM
- attention: Q/K/V projections + scaled dot product + mask + softmax -> ATTENTION
- skip_layer_norm: residual add + LayerNorm (+ the sub-layer bias) -> SKIP_LAYER_NORM
- bias_gelu: linear bias + GELU -> BIAS_GELU
- dead_code: drop what the rewrites orphaned
"""

from __future__ import annotations

from collections.abc import Sequence

from bertrt.graph.ir import Graph
from bertrt.graph.passes import (
    dead_code,
    fuse_attention,
    fuse_bias_gelu,
    fuse_embed_layer_norm,
    fuse_skip_layer_norm,
    shape_inference,
)
from bertrt.graph.passes.base import Pass, PassResult

FUSIONS: dict[str, Pass] = {
    "embed_layer_norm": Pass("embed_layer_norm", fuse_embed_layer_norm.run,
                             "embeddings sum + LayerNorm -> EMBED_LAYER_NORM"),
    "attention": Pass("attention", fuse_attention.run,
                      "QKV + scaled dot product + mask + softmax -> ATTENTION"),
    "skip_layer_norm": Pass("skip_layer_norm", fuse_skip_layer_norm.run,
                            "residual add + LayerNorm -> SKIP_LAYER_NORM"),
    "bias_gelu": Pass("bias_gelu", fuse_bias_gelu.run, "bias + GELU -> BIAS_GELU"),
}
DEAD_CODE = Pass("dead_code", dead_code.run, "remove unread nodes and unused parameters")
SHAPE_INFERENCE = Pass("shape_inference", shape_inference.run, "re-run shape rules")

#: Fusions worth applying per target. On CPU the torch lowering takes only ATTENTION (its
#: reference runs torch's fused scaled-dot-product kernel); the others pay off with kernels.
PIPELINES: dict[str, tuple[str, ...]] = {
    "all": tuple(FUSIONS),
    "torch": ("attention",),
}


def fuse(graph: Graph, passes: Sequence[str] | str = "all") -> PassResult:
    """Run fusion passes in place, then dead-code removal; returns the combined counts."""
    names = PIPELINES[passes] if isinstance(passes, str) else tuple(passes)
    unknown = [n for n in names if n not in FUSIONS]
    if unknown:
        raise ValueError(f"unknown fusion pass(es) {unknown}; expected {list(FUSIONS)}")
    total = PassResult()
    for name in names:
        total.merge(FUSIONS[name].run(graph))
    cleanup = DEAD_CODE.run(graph)
    total.changed |= cleanup.changed
    return total


def fused_copy(graph: Graph, passes: Sequence[str] | str = "all") -> tuple[Graph, PassResult]:
    """A fused copy of `graph` (the original is left as built)."""
    copy = graph.copy()
    result = fuse(copy, passes)
    copy.verify()
    return copy, result


__all__ = ["DEAD_CODE", "FUSIONS", "PIPELINES", "Pass", "PassResult", "SHAPE_INFERENCE",
           "fuse", "fused_copy"]
