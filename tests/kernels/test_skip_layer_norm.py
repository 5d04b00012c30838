"""SkipLayerNorm's reference against LayerNorm(x + bias + skip) written out, forward and
backward, with and without the bias."""

from __future__ import annotations

import pytest

from bertrt.kernels.skip_layer_norm.reference import skip_layer_norm

EPS = 1e-3  # large enough that a kernel using another eps fails


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_skip_layer_norm_matches_unfused(with_bias, training, matches_unfused, make_randn,
                                         unfused_layer_norm):
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
        return unfused_layer_norm(y, weight, beta, EPS)

    matches_unfused(fused, unfused, inputs)
