"""SkipLayerNorm's reference against LayerNorm(x + bias + skip) written out, forward and
backward, with and without the bias."""

from __future__ import annotations

import pytest
import torch

from bertrt.kernels.skip_layer_norm.reference import skip_layer_norm

EPS = 1e-3  # large enough that a kernel using another eps fails


def layer_norm(y: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
               eps: float) -> torch.Tensor:
    """Over the last axis, with the biased variance."""
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * weight + beta


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_skip_layer_norm_matches_unfused(with_bias, training, matches_unfused, make_randn):
    h = 24
    inputs = {"x": make_randn(3, 7, h, seed=1), "skip": make_randn(3, 7, h, seed=2),
              "weight": 1.0 + 0.2 * make_randn(h, seed=3), "beta": make_randn(h, seed=4)}
    if with_bias:
        inputs["bias"] = make_randn(h, seed=5)

    def fused(x, skip, weight, beta, bias=None):
        return skip_layer_norm(x, skip, weight, beta, bias, eps=EPS, dropout=0.0,
                               training=training)

    def unfused(x, skip, weight, beta, bias=None):
        y = x + skip if bias is None else x + bias + skip
        return layer_norm(y, weight, beta, EPS)

    matches_unfused(fused, unfused, inputs)
