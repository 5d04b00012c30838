"""Graph passes. Every pass has one contract: `run(graph) -> PassResult(changed, counts)`.

The fusion pipeline, in order (each a file: pattern, check, rewrite):

- embed_layer_norm: word + position + token-type lookups, sum, LayerNorm -> EMBED_LAYER_NORM
- attention: Q/K/V projections + scaled dot product + mask + softmax -> ATTENTION
- skip_layer_norm: residual add + LayerNorm (+ the sub-layer bias) -> SKIP_LAYER_NORM
- bias_gelu: linear bias + GELU -> BIAS_GELU
- dead_code: drop what the rewrites orphaned

Pipelines are named lists of these (`PIPELINES`); `Model.to_torch(fuse=...)` and
`Model.export_onnx(fuse=...)` take the same names, and `fuse=True` means the target's default
(`DEFAULT_PIPELINES`).
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
    mask_index,
    pack,
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

#: Rewrites that prepare a graph for one runtime (not fusions: they change no numbers).
REWRITES: dict[str, Pass] = {
    "mask_index": Pass("mask_index", mask_index.run,
                       "right padding: attention reads per-row lengths (MASK_INDEX)"),
    "pack": Pass("pack", pack.run, "padding-free: token-wise ops on (T, H), attention by "
                 "cu_seqlens"),
}

#: Named pipelines. On CPU the torch lowering takes only ATTENTION (its reference runs torch's
#: fused scaled-dot-product kernel); the others pay off with kernels or in ONNX Runtime, whose
#: Attention also reads per-row lengths fastest ("ort", for right-padded inputs only).
PIPELINES: dict[str, tuple[str, ...]] = {
    "none": (),
    "torch": ("attention",),
    "all": tuple(FUSIONS),
    "ort": (*FUSIONS, "mask_index"),
    # packed (padding-free) forms: attention fused first, the embeddings left unfused
    "torch-packed": ("attention", "pack"),
    "packed": ("attention", "pack", "skip_layer_norm", "bias_gelu"),
}

#: What `fuse=True` means per target.
DEFAULT_PIPELINES = {"torch": "torch", "onnx-ort": "ort", "onnx-standard": "all"}


def pipeline(fuse: bool | str | Sequence[str], target: str) -> tuple[str, ...]:
    """The pass names that `fuse` asks for on `target` (a key of `DEFAULT_PIPELINES`):
    True -> the target's default, False -> none, a name -> that pipeline, a list -> itself."""
    if fuse is True:
        fuse = DEFAULT_PIPELINES[target]
    if fuse is False or fuse is None:
        return ()
    if isinstance(fuse, str):
        if fuse not in PIPELINES:
            raise ValueError(f"fuse: unknown pipeline {fuse!r}; expected one of "
                             f"{', '.join(PIPELINES)}, True or False")
        return PIPELINES[fuse]
    return tuple(fuse)


def fuse(graph: Graph, passes: Sequence[str] | str = "all") -> PassResult:
    """Run the passes of a pipeline (a name or a list) in place, then dead-code removal;
    returns the combined counts and refusals."""
    names = pipeline(passes, "torch") if isinstance(passes, str) else tuple(passes)
    known = {**FUSIONS, **REWRITES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; expected {list(known)}")
    total = PassResult()
    for name in names:
        total.merge(known[name].run(graph))
    cleanup = DEAD_CODE.run(graph)
    total.changed |= cleanup.changed
    return total


def fused_copy(graph: Graph, passes: Sequence[str] | str = "all") -> tuple[Graph, PassResult]:
    """A fused copy of `graph` (the original is left as built)."""
    copy = graph.copy()
    result = fuse(copy, passes)
    copy.verify()
    return copy, result


__all__ = ["DEAD_CODE", "DEFAULT_PIPELINES", "FUSIONS", "PIPELINES", "REWRITES", "Pass",
           "PassResult", "SHAPE_INFERENCE", "fuse", "fused_copy", "pipeline"]
