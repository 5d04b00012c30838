"""The packed-QKV attention path against the reference, forward and backward, and its cache."""

from __future__ import annotations

import math

import torch

from bertrt.kernels.attention import attention, reference


def _args(seed: int = 0, b: int = 2, s: int = 7, h: int = 24, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h, generator=gen, dtype=dtype)
    ws = [torch.randn(h, h, generator=gen, dtype=dtype) * 0.2 for _ in range(3)]
    bs = [torch.randn(h, generator=gen, dtype=dtype) * 0.1 for _ in range(3)]
    mask = torch.ones(b, s, dtype=dtype)
    mask[1, 4:] = 0
    bias = ((1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min).to(dtype)
    return [x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], bias]


def test_packed_matches_reference_forward_and_backward():
    args = _args()
    for t in args[:7]:
        t.requires_grad_(True)
    kw = dict(heads=3, scale=1 / math.sqrt(8))
    out = attention(*args, **kw)
    ref = reference(*args, **kw)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, args[:7], g)
    ref_grads = torch.autograd.grad(ref, args[:7], g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_cache_follows_in_place_updates():
    args = _args(1, dtype=torch.float32)
    kw = dict(heads=3, scale=0.3)
    with torch.inference_mode():
        first = attention(*args, **kw)
        again = attention(*args, **kw)
    assert torch.equal(first, again)
    with torch.no_grad():
        args[3].mul_(0.5)  # an optimizer-style in-place update of the key weight
        args[6].add_(1.0)  # ... and of the value bias
    with torch.inference_mode():
        updated = attention(*args, **kw)
    assert torch.allclose(updated, reference(*args, **kw), atol=1e-5)
    assert not torch.allclose(updated, first, atol=1e-3)
