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


def token_positions(cu_seqlens: torch.Tensor,
                    total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens: each token's sequence index and its position in it, both (T,) int64.

    `total` is T when the caller knows it (from a tensor's shape): on CUDA the device is then
    never asked for it (a host sync).
    """
    cu = cu_seqlens.long()
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device),
                                  cu[1:] - cu[:-1], output_size=total)
    return seq, torch.arange(seq.numel(), device=cu.device) - cu[:-1][seq]


def packed_layout(cu_seqlens: torch.Tensor, max_seqlen: int | None = None,
                  total: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each packed token sits in the padded (B, Smax) view of its batch.

    Args:
        cu_seqlens: (B+1,) cumulative lengths, 0 first.
        max_seqlen: Smax, when the caller knows it (else read from the device).
        total: T, when the caller knows it (see `token_positions`).

    Returns:
        `slots` (T,) int64: b*Smax + s of token t (its sequence b, position s); `lengths` (B,);
        Smax, the longest length.
    """
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    if max_seqlen is not None:
        smax = max_seqlen
    else:
        smax = int(lengths.max()) if lengths.numel() else 0
    seq, pos = token_positions(cu, total)
    return seq * smax + pos, lengths, smax


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

    The projections run on the T real tokens; only the attention core sees the padded
    (B, N, Smax, D) view, with the keys past each length masked as `attention` masks them.
    `max_seqlen` is the longest length when the caller knows it (no device read).
    """
    t, h = x.shape
    slots, lengths, smax = packed_layout(cu_seqlens, max_seqlen, total=t)
    b, d = lengths.numel(), h // heads

    def padded(w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # (T, H) -> (B*Smax, H) with the tokens in their slots -> (B, N, Smax, D)
        y = F.linear(x, w, bias)
        out = y.new_zeros(b * smax, h).index_copy(0, slots, y)
        return out.view(b, smax, heads, d).transpose(1, 2)

    q, k, v = padded(q_weight, q_bias), padded(k_weight, k_bias), padded(v_weight, v_bias)
    bias = key_mask_bias(lengths, smax).to(q.dtype)
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout if training else 0.0, scale=scale
    )
    # (B, N, Smax, D) -> (B*Smax, H) -> the real tokens (T, H)
    return context.transpose(1, 2).reshape(b * smax, h).index_select(0, slots)
