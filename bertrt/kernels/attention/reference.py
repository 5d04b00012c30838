"""Pure-torch multi-head self-attention (the reference every kernel is checked against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MASK_MIN = torch.finfo(torch.float32).min


def key_mask_bias(mask: torch.Tensor, seq: int) -> torch.Tensor:
    """The additive (B, 1, 1, S) float32 bias of a key mask: 0 where attended, float32 min
    where not, as the reference implementation builds it.

    Args:
        mask: (B, S) 1/0 per key, or (B,) per-row lengths (right padding: keys 0..len-1).
        seq: S, the number of keys.
    """
    if mask.dim() == 1:  # (B,) lengths -> (B, S) 1/0
        mask = torch.arange(seq, device=mask.device)[None, :] < mask[:, None]
    keep = mask[:, None, None, :].to(torch.float32)
    return (1.0 - keep) * _MASK_MIN


def attention(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    heads: int,
    scale: float,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """softmax(Q K^T * scale + bias(mask)) V, heads merged: (B, S, H) -> (B, S, H).

    `mask` is the (B, S) 1/0 key mask or (B,) key lengths; None attends everywhere.
    """
    b, s, h = x.shape
    d = h // heads
    # (B, S, H) -> (B, N, S, D) for each of Q, K, V
    q = F.linear(x, q_weight, q_bias).view(b, s, heads, d).transpose(1, 2)
    k = F.linear(x, k_weight, k_bias).view(b, s, heads, d).transpose(1, 2)
    v = F.linear(x, v_weight, v_bias).view(b, s, heads, d).transpose(1, 2)
    bias = None if mask is None else key_mask_bias(mask, s).to(q.dtype)
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout if training else 0.0, scale=scale
    )
    # (B, N, S, D) -> (B, S, H)
    return context.transpose(1, 2).reshape(b, s, h)
