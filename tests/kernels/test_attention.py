"""Attention's reference against the projections, scaled dot product, mask, softmax and merge
written out, forward and backward, without a mask, with a (B, S) key mask and with the same
mask as (B,) key lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bertrt.kernels.attention.reference import attention, key_mask_bias

B, S, H, N = 3, 6, 16, 4
D = H // N
SCALE = 0.37  # not 1/sqrt(D): a kernel that ignores `scale` fails
MASK = torch.tensor([[1, 1, 1, 1, 1, 1],  # (B, S): one full row, two right-padded ones
                     [1, 1, 1, 1, 0, 0],
                     [1, 0, 0, 0, 0, 0]])
FLOAT32_MIN = torch.finfo(torch.float32).min


def unfused_attention(x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, mask):
    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, N, S, D)
        return t.reshape(B, S, N, D).permute(0, 2, 1, 3)

    q = heads(F.linear(x, q_weight, q_bias))
    k = heads(F.linear(x, k_weight, k_bias))
    v = heads(F.linear(x, v_weight, v_bias))
    scores = torch.matmul(q, k.transpose(-1, -2)) * SCALE  # (B, N, S, S)
    if mask is not None:  # keys only: (B, S) -> (B, 1, 1, S)
        scores = scores + (1.0 - mask[:, None, None, :].double()) * FLOAT32_MIN
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(B, S, H)  # (B, N, S, D) -> (B, S, H)


def _inputs(make_randn) -> dict[str, torch.Tensor]:
    out = {"x": make_randn(B, S, H, seed=1)}
    for i, name in enumerate("qkv"):
        out[f"{name}_weight"] = 0.5 * make_randn(H, H, seed=10 + i)
        out[f"{name}_bias"] = 0.5 * make_randn(H, seed=20 + i)
    return out


@pytest.mark.parametrize("mask_kind", ["none", "mask", "mask-bool", "lengths", "lengths-int32"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_attention_matches_unfused(mask_kind, training, matches_unfused, make_randn):
    given = {"none": None, "mask": MASK, "mask-bool": MASK.bool(), "lengths": MASK.sum(1),
             "lengths-int32": MASK.sum(1).to(torch.int32)}[mask_kind]

    def fused(**t):
        return attention(*t.values(), given, heads=N, scale=SCALE, dropout=0.0,
                         training=training)

    def unfused(**t):
        return unfused_attention(*t.values(), None if given is None else MASK)

    matches_unfused(fused, unfused, _inputs(make_randn))


def test_the_mask_changes_the_output(make_randn):
    """Padding keys are ignored, so "mask" and "none" above are different cases: the padded rows
    change, and values at the masked keys of a row do not reach it."""
    t = _inputs(make_randn)
    masked = attention(*t.values(), MASK, heads=N, scale=SCALE)
    unmasked = attention(*t.values(), None, heads=N, scale=SCALE)
    torch.testing.assert_close(masked[0], unmasked[0], rtol=1e-12, atol=1e-12)  # a full row
    assert (masked - unmasked)[1:].abs().amax(dim=(1, 2)).min() > 1e-2
    x = t["x"].clone()
    x[2, 1:] += 10.0  # row 2 attends to key 0 only: every query of it gets value 0
    moved = attention(x, *list(t.values())[1:], MASK, heads=N, scale=SCALE)
    torch.testing.assert_close(moved[2], masked[2], rtol=1e-12, atol=1e-12)


def test_key_mask_bias():
    """0 where a key is attended, float32 min where not, (B, 1, 1, S) float32; lengths give the
    same bias as the right-padded mask."""
    want = torch.tensor([[0.0] * 6, [0.0] * 4 + [FLOAT32_MIN] * 2, [0.0] + [FLOAT32_MIN] * 5])
    want = want[:, None, None, :]
    for given in (MASK, MASK.bool(), MASK.sum(1), MASK.sum(1).to(torch.int32)):
        got = key_mask_bias(given, S)
        assert got.dtype == torch.float32 and got.shape == (B, 1, 1, S)
        assert torch.equal(got, want), given
