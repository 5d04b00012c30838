"""Fused word + position + token-type embeddings, LayerNorm and dropout (EmbedLayerNorm).

`embed_layer_norm` runs the CuPy kernels (`embed_layer_norm.cu`, through
`EmbedLayerNormFunction`) when every tensor is on CUDA, CuPy imports, kernels are on
(`bertrt.kernels.cuda`), the float dtypes are float32 / bfloat16 / float16 and hidden <= 4096;
otherwise the pure-torch reference.

Only the padded (B, S) graph calls it: positions are 0..S-1 in every row. The packed graph
keeps its embeddings unfused (`bertrt.graph.passes.pack` refuses EMBED_LAYER_NORM, and its
restarting positions come from PACKED_POSITIONS), so no position-ids argument is needed.
"""

from __future__ import annotations

import torch

from bertrt.kernels import cuda
from bertrt.kernels.embed_layer_norm import reference
from bertrt.kernels.embed_layer_norm.function import CUDA, EmbedLayerNormFunction
from bertrt.kernels.skip_layer_norm import output_dtype
from bertrt.kernels.skip_layer_norm.function import MAX_HIDDEN, draw_seed

__all__ = ["embed_layer_norm"]


def _check(input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, word: torch.Tensor,
           position: torch.Tensor, token_type: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor) -> None:
    """Shapes the kernel relies on, as one-line errors (the ids' values are the caller's)."""
    if input_ids.dim() != 2:
        raise ValueError(f"embed_layer_norm: input_ids must be (batch, seq), got shape "
                         f"{tuple(input_ids.shape)}")
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
        raise ValueError(f"embed_layer_norm: token_type_ids {tuple(token_type_ids.shape)} "
                         f"differ from input_ids {tuple(input_ids.shape)}")
    hidden = word.shape[-1]
    for name, t in (("position", position), ("token_type", token_type)):
        if t.dim() != 2 or t.shape[1] != hidden:
            raise ValueError(f"embed_layer_norm: the {name} table has shape {tuple(t.shape)}, "
                             f"expected (rows, {hidden})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (hidden,):
            raise ValueError(f"embed_layer_norm: {name} has shape {tuple(t.shape)}, "
                             f"expected ({hidden},)")
    if input_ids.shape[1] > position.shape[0]:
        raise ValueError(f"embed_layer_norm: sequence length {input_ids.shape[1]} exceeds the "
                         f"position table's {position.shape[0]} rows")


def embed_layer_norm(
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    eps: float = 1e-12,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """dropout(LayerNorm(word[ids] + token_type[types] + position[0..S-1])): (B, S) -> (B, S, H).

    On the kernel path the output dtype is `output_dtype(word, position, token_type)` (float32
    under autocast, else the tables' dtype), what the reference returns. The kernel trusts
    the ids to index inside the tables: the torch lowering checks them
    (`LoweredModule.check_inputs`); a caller that switches that off must keep them in range.
    Dropout draws its Philox seed from torch's default CPU generator, as `skip_layer_norm`.
    """
    floats = (word, position, token_type, weight, bias)
    if not (cuda.wants_kernel(input_ids, token_type_ids, *floats) and input_ids.numel() > 0
            and word.dim() == 2 and 0 < word.shape[1] <= MAX_HIDDEN
            and all(t.dtype in cuda.CTYPES for t in floats)):
        return reference.embed_layer_norm(input_ids, token_type_ids, word, position, token_type,
                                          weight, bias, eps=eps, dropout=dropout,
                                          training=training)
    _check(input_ids, token_type_ids, word, position, token_type, weight, bias)
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"embed_layer_norm: dropout must be in [0, 1], got {dropout}")
    p = float(dropout) if training else 0.0
    seed = draw_seed() if p > 0.0 else 0
    types = None if token_type_ids is None else token_type_ids.long().contiguous()
    tensors = [t.contiguous() for t in floats]
    if not torch.is_grad_enabled():  # nothing saved for a backward that cannot come
        tensors = [t.detach() for t in tensors]
    return EmbedLayerNormFunction.apply(input_ids.long().contiguous(), types, *tensors,
                                        float(eps), p, seed,
                                        output_dtype(word, position, token_type), CUDA)
