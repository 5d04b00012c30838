"""Fused multi-head self-attention: QKV projections, scaled dot product, mask, softmax, context.

On CPU the reference is also the fast path: torch's fused scaled-dot-product kernel does the
attention, and three projections cost the same as one packed product at BERT's sizes (packing
per call costs a copy; caching a packed weight would go stale when an optimizer updates the
parameters through `.data` or a fused kernel, which no version counter sees). On CUDA, SDPA
picks flash or memory-efficient attention itself; packed attention takes torch's varlen flash
path where it applies (`varlen.py`: fp16/bf16, no attention dropout), else the padded view.
"""

from __future__ import annotations

import torch

from bertrt.kernels.attention import reference, varlen
from bertrt.kernels.attention.reference import (
    attention,
    key_mask_bias,
    packed_layout,
    token_positions,
)

__all__ = ["attention", "key_mask_bias", "packed_attention", "packed_layout", "token_positions"]


def packed_attention(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    heads: int,
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Self-attention over packed tokens: (T, H) -> (T, H), each sequence on its own.

    `cu_seqlens` (B+1,) cumulative lengths; `max_seqlen` the longest, when the caller knows it
    on the host (else it is read from the device). See `reference.packed_attention`.
    """
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    computed = torch.get_autocast_dtype("cuda") if autocast else x.dtype  # the products'

    if varlen.usable(x, heads, scale, dropout, training, computed):
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return varlen.packed_attention(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                                       cu_seqlens, max_seqlen, heads=heads, scale=scale)
    return reference.packed_attention(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                                      cu_seqlens, heads=heads, scale=scale, dropout=dropout,
                                      training=training, max_seqlen=max_seqlen)
