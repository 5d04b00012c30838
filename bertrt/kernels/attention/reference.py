"""Pure-torch multi-head self-attention (the reference every kernel is checked against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor,
    mask_bias: torch.Tensor | None,
    *,
    heads: int,
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """softmax(Q K^T * scale + mask_bias) V, heads merged: (B, S, H) -> (B, S, H)."""
    b, s, h = x.shape
    d = h // heads
    # (B, S, H) -> (B, N, S, D) for each of Q, K, V
    q = F.linear(x, q_weight, q_bias).view(b, s, heads, d).transpose(1, 2)
    k = F.linear(x, k_weight, k_bias).view(b, s, heads, d).transpose(1, 2)
    v = F.linear(x, v_weight, v_bias).view(b, s, heads, d).transpose(1, 2)
    if mask_bias is not None:
        mask_bias = mask_bias.to(q.dtype)
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask_bias, dropout_p=dropout if training else 0.0, scale=scale
    )
    # (B, N, S, D) -> (B, S, H)
    return context.transpose(1, 2).reshape(b, s, h)
