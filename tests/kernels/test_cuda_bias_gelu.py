"""The BiasGelu CUDA kernels against the float64 reference, forward and backward, both forms,
on fp32/bf16/fp16 (and bf16 with an fp32 bias, as under autocast), edge shapes, both vector
widths and strided inputs.

The bound: a kernel's error against float64 is at most twice that of torch's own ops on the
same low-precision inputs, plus a small floor relative to the values' scale (the two GELU forms
differ by ~1e-4 at |x| ~ 2, so a kernel computing the wrong one fails in fp32). Skipped without
CuPy or CUDA.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from bertrt.kernels import cuda  # noqa: E402
from bertrt.kernels.bias_gelu import reference  # noqa: E402

bg = importlib.import_module("bertrt.kernels.bias_gelu")

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(FLOOR)
FORMS = ["none", "tanh"]
DEV = "cuda"


def assert_close_to_exact(name, got, low, exact, dtype):
    """`got` (kernel) is within 2x the error of `low` (torch's ops in `dtype`) of `exact`."""
    assert got.dtype == low.dtype and got.shape == exact.shape, name
    scale = max(1.0, exact.abs().max().item())
    err = (got.double() - exact).abs().max().item()
    base = (low.double() - exact).abs().max().item()
    assert err <= 2 * base + FLOOR[dtype] * scale, \
        f"{name}: kernel error {err:.3g}, torch's {base:.3g} (scale {scale:.3g})"


def make(shape, dtype, bias_dtype=None, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = 2.0 * torch.randn(shape, generator=gen, device=DEV)
    bias = torch.randn(shape[-1], generator=gen, device=DEV)
    return x.to(dtype), bias.to(bias_dtype or dtype)


def run(fn, x, bias, upstream, approximate):
    # fresh leaves on the same storage (a clone would lose a view's offset)
    x, bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
    out = fn(x, bias, approximate=approximate)
    dx, dbias = torch.autograd.grad(out, [x, bias], upstream.to(out.dtype))
    return out, dx, dbias


def check(x, bias, dtype, approximate, name=""):
    upstream = torch.randn(x.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(9))
    got = run(bg.bias_gelu, x, bias, upstream, approximate)
    assert "BiasGeluFunction" in type(got[0].grad_fn).__name__, "the kernel did not run"
    low = run(reference.bias_gelu, x, bias, upstream, approximate)
    exact = run(reference.bias_gelu, x.double(), bias.double(), upstream.double(), approximate)
    for what, g, lo, ex in zip(("out", "dx", "dbias"), got, low, exact):
        assert_close_to_exact(f"{name} {approximate} {what}", g, lo, ex, dtype)
    assert got[1].dtype == x.dtype and got[2].dtype == bias.dtype


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [128, 768, 1024, 3072, 4096, 1000, 1001, 1])
def test_hidden_sizes(hidden, dtype, approximate):
    """Multiples of 4 take the vector path, 1001 and 1 the scalar one."""
    check(*make((3, 37, hidden), dtype), dtype, approximate, name=f"h{hidden}")


@pytest.mark.parametrize("approximate", FORMS)
def test_one_row_and_many_rows(approximate):
    check(*make((1, 3072), torch.float32), torch.float32, approximate, name="1 row")
    check(*make((65_537, 128), torch.bfloat16), torch.bfloat16, approximate, name="65537 rows")


@pytest.mark.parametrize("approximate", FORMS)
def test_bf16_activations_with_an_fp32_bias(approximate):
    x, bias = make((8, 64, 3072), torch.bfloat16, bias_dtype=torch.float32)
    check(x, bias, torch.bfloat16, approximate)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # GELU is on no autocast list
        assert bg.bias_gelu(x, bias).dtype == reference.bias_gelu(x, bias).dtype == torch.float32


def test_a_misaligned_view_takes_the_scalar_path():
    x, bias = make((4 * 768 + 1,), torch.float32)
    view = x[1:].view(4, 768)  # 4-byte offset: not 16-byte aligned, yet contiguous
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    check(view, bias[:768].contiguous(), torch.float32, "none")


def test_non_contiguous_inputs_are_copied():
    x, bias = make((16, 8, 768), torch.float32)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    torch.testing.assert_close(bg.bias_gelu(strided, bias), bg.bias_gelu(x, bias),
                               rtol=0, atol=0)


def test_use_kernels_false_runs_the_reference():
    x, bias = make((2, 64), torch.float32)
    with cuda.use_kernels(False):
        out = bg.bias_gelu(x.requires_grad_(), bias)
    assert "BiasGeluFunction" not in type(out.grad_fn).__name__
