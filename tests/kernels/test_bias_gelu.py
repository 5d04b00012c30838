"""BiasGelu's reference against gelu(x + bias) written out, both forms, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch

from bertrt.kernels.bias_gelu.reference import bias_gelu


def unfused_bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    y = x + bias
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (y + 0.044715 * y * y * y)
        return 0.5 * y * (1.0 + torch.tanh(inner))
    return 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_matches_unfused(approximate, matches_unfused, make_randn):
    inputs = {"x": 2.0 * make_randn(2, 5, 16, seed=1), "bias": make_randn(16, seed=2)}
    matches_unfused(lambda x, bias: bias_gelu(x, bias, approximate=approximate),
                    lambda x, bias: unfused_bias_gelu(x, bias, approximate), inputs)


def test_the_two_forms_differ(make_randn):
    """The forms differ by ~1e-4 at |x| ~ 2, far above the 1e-10 bound: a kernel computing the
    wrong one fails the test above."""
    x, bias = 2.0 * make_randn(2, 5, 16, seed=1), make_randn(16, seed=2)
    gap = (bias_gelu(x, bias, approximate="tanh") - bias_gelu(x, bias)).abs().max()
    assert gap > 1e-5
