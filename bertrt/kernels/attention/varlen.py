"""Packed attention on CUDA through torch's variable-length flash attention.

`torch.nn.attention.varlen.varlen_attn` (torch >= 2.9) runs each sequence of a packed batch on
its own from the cumulative lengths, on the T real tokens: no padded (B, N, Smax, D) view, no
mask. It takes fp16/bf16 CUDA tensors and has no dropout, so it serves inference and training
without attention dropout; everything else runs the padded-view SDPA of `reference.py`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

#: The dtypes the flash kernels take.
DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def varlen_attn() -> tuple[Callable[..., torch.Tensor], bool] | None:
    """torch's `varlen_attn` and whether it takes `scale=`, or None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn as fn
    except ImportError:
        return None
    return fn, "scale" in inspect.signature(fn).parameters


def usable(x: torch.Tensor, heads: int, scale: float, dropout: float, training: bool,
           dtype: torch.dtype | None = None) -> bool:
    """Whether `packed_attention` on `x` may take the varlen path: a CUDA tensor computed in
    fp16/bf16 (`dtype`: its autocast dtype, else its own), no attention dropout in this call,
    a head size the flash kernels take, and a scale torch's function can be given."""
    if not x.is_cuda or (training and dropout > 0.0):
        return False
    if (dtype or x.dtype) not in DTYPES:
        return False
    found = varlen_attn()
    if found is None:
        return False
    d = x.shape[-1] // heads
    takes_scale = found[1]
    return d % 8 == 0 and d <= 256 and (takes_scale or math.isclose(scale, d ** -0.5))


def packed_attention(x: torch.Tensor, q_weight: torch.Tensor, q_bias: torch.Tensor,
                     k_weight: torch.Tensor, k_bias: torch.Tensor, v_weight: torch.Tensor,
                     v_bias: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
                     heads: int, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale) V per sequence of the packed (T, H) tokens -> (T, H).

    `cu_seqlens` (B+1,) int32 on `x`'s device, `max_seqlen` the longest length (a host int:
    the kernel's grid needs it). Call only where `usable` says so.
    """
    found = varlen_attn()
    assert found is not None, "varlen_attn is unavailable: check usable() first"
    fn, takes_scale = found
    t, h = x.shape
    d = h // heads
    # (T, H) -> (T, N, D) each: the layout varlen_attn takes, a view of the projection
    q, k, v = (F.linear(x, w, b).view(t, heads, d)
               for w, b in ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias)))
    cu = cu_seqlens.to(torch.int32)
    kwargs: dict[str, Any] = {"scale": scale} if takes_scale else {}
    out = fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)
    return out.reshape(t, h)  # (T, N, D) -> (T, H)
