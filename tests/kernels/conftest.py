"""The kernel tests' one check: a fused op's reference against the unfused torch ops written out
in the test, in float64, forward and backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

# float64 leaves a bound far below any formula slip (a missing eps or scale moves ~1e-4).
TOL = {"rtol": 1e-10, "atol": 1e-10}


def randn(*shape: int, seed: int) -> torch.Tensor:
    """A seeded float64 standard-normal tensor."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def layer_norm(y: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
               eps: float) -> torch.Tensor:
    """LayerNorm written out: over the last axis, with the biased variance."""
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * weight + beta


def assert_matches_unfused(fused: Callable[..., torch.Tensor],
                           unfused: Callable[..., torch.Tensor],
                           inputs: dict[str, torch.Tensor], seed: int = 0) -> None:
    """`fused(**inputs)` equals `unfused(**inputs)`, and so does the gradient of each input
    (every one must be used) for one random upstream gradient."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}
    got, want = fused(**leaves), unfused(**leaves)
    assert got.dtype == want.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)
    upstream = randn(*got.shape, seed=seed + 1)
    grads_got = torch.autograd.grad(got, list(leaves.values()), upstream, allow_unused=True)
    grads_want = torch.autograd.grad(want, list(leaves.values()), upstream)
    for name, g, w in zip(leaves, grads_got, grads_want):
        assert w.abs().max() > 0, f"d/d{name} is zero: the case does not test it"
        assert g is not None, f"d/d{name}: the fused op does not differentiate its {name}"
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.fixture(scope="session")
def matches_unfused() -> Callable[..., None]:
    """`matches_unfused(fused, unfused, inputs, seed=0)`: see `assert_matches_unfused`."""
    return assert_matches_unfused


@pytest.fixture(scope="session")
def make_randn() -> Callable[..., torch.Tensor]:
    """`make_randn(*shape, seed=...)`: a seeded float64 standard-normal tensor."""
    return randn


@pytest.fixture(scope="session")
def unfused_layer_norm() -> Callable[..., torch.Tensor]:
    """`unfused_layer_norm(y, weight, beta, eps)`: see `layer_norm`."""
    return layer_norm
