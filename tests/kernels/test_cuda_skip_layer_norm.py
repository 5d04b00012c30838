"""The SkipLayerNorm CUDA kernels against the float64 reference, forward and backward, on
fp32/bf16/fp16 (and mixed, autocast-like) inputs, edge shapes, dropout and strided inputs.

The bound: a kernel's error against float64 is at most twice that of torch's own unfused ops
on the same low-precision inputs, plus a small floor relative to the values' scale. A formula
slip (a missing eps, a wrong mean) costs far more than either. Skipped without CuPy or CUDA.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from bertrt.kernels import cuda  # noqa: E402
from bertrt.kernels.skip_layer_norm import reference  # noqa: E402
from bertrt.kernels.skip_layer_norm.function import draw_seed, dropout_mask  # noqa: E402

sln = importlib.import_module("bertrt.kernels.skip_layer_norm")

EPS = 1e-3  # a kernel ignoring eps moves outputs by ~5e-4: above the fp32 bound
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(FLOOR)
DEV = "cuda"


def assert_close_to_exact(name, got, low, exact, dtype):
    """`got` (kernel) is within 2x the error of `low` (torch's ops in `dtype`) of `exact`."""
    assert got.dtype == low.dtype and got.shape == exact.shape, name
    scale = max(1.0, exact.abs().max().item())
    err = (got.double() - exact).abs().max().item()
    base = (low.double() - exact).abs().max().item()
    assert err <= 2 * base + FLOOR[dtype] * scale, \
        f"{name}: kernel error {err:.3g}, torch's {base:.3g} (scale {scale:.3g})"


def make(rows_shape, hidden, dtype, *, act_dtype=None, with_bias=True, seed=0):
    """Inputs: activations in `act_dtype` (default `dtype`), parameters in `dtype`."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    act = act_dtype or dtype

    def r(*shape, dt, scale=1.0, shift=0.0):
        t = torch.randn(shape, generator=gen, device=DEV, dtype=torch.float32)
        return (t * scale + shift).to(dt)

    return {"x": r(*rows_shape, hidden, dt=act), "skip": r(*rows_shape, hidden, dt=act),
            "weight": r(hidden, dt=dtype, scale=0.2, shift=1.0), "beta": r(hidden, dt=dtype),
            "bias": r(hidden, dt=dtype) if with_bias else None}


def run(fn, inputs, upstream, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()
              if v is not None}
    args = [leaves.get(k) for k in ("x", "skip", "weight", "beta", "bias")]
    out = fn(*args, eps=EPS, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), upstream.to(out.dtype))
    return out, dict(zip(leaves, grads))


def check(inputs, dtype, *, dropout=0.0, seed=0, name=""):
    """Kernel vs torch-in-dtype vs float64, output and every gradient (same dropout mask)."""
    x = inputs["x"]
    rows, hidden = x.numel() // x.shape[-1], x.shape[-1]
    upstream = torch.randn(x.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(9))
    torch.manual_seed(seed)
    got, g_got = run(sln.skip_layer_norm, inputs, upstream, dropout=dropout,
                     training=dropout > 0)
    assert "SkipLayerNormFunction" in type(got.grad_fn).__name__, "the kernel did not run"
    mask = None
    if dropout > 0:
        torch.manual_seed(seed)
        mask = dropout_mask(draw_seed(), rows, hidden, dropout, x.device).view(x.shape)
    kw = dict(dropout=dropout, training=dropout > 0, mask=mask)
    low, g_low = run(reference.skip_layer_norm, inputs, upstream, **kw)
    exact_inputs = {k: None if v is None else v.double() for k, v in inputs.items()}
    exact, g_exact = run(reference.skip_layer_norm, exact_inputs, upstream.double(), **kw)
    assert_close_to_exact(f"{name} out", got, low, exact, dtype)
    for k in g_got:
        assert g_got[k].dtype == inputs[k].dtype, k
        assert_close_to_exact(f"{name} d{k}", g_got[k], g_low[k], g_exact[k], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [128, 384, 768, 1024, 1000, 4096, 33, 1])
def test_hidden_sizes(hidden, dtype):
    check(make((3, 37), hidden, dtype), dtype, name=f"h{hidden}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_row_and_no_bias(dtype):
    check(make((1,), 768, dtype), dtype, name="1 row")
    check(make((4, 5), 768, dtype, with_bias=False), dtype, name="no bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_rows(dtype):
    """>= 65,536 rows: 64-bit offsets, and the backward's rows-per-block loop."""
    check(make((65_539,), 256, dtype), dtype, name="65539 rows")


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_activations_with_fp32_parameters(act):
    inputs = make((8, 128), 768, torch.float32, act_dtype=act)
    inputs["skip"] = inputs["skip"].float()  # the residual stream stays fp32
    check(inputs, act)


def test_under_autocast_the_output_is_fp32_as_the_reference():
    inputs = make((8, 128), 768, torch.float32, act_dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = sln.skip_layer_norm(*inputs.values(), eps=EPS)
        want = reference.skip_layer_norm(*inputs.values(), eps=EPS)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_uses_the_mask_it_reports(p, dtype):
    check(make((16, 64), 768, dtype), dtype, dropout=p, seed=3, name=f"p={p}")


def test_dropout_keep_rate_and_independence():
    p, rows, hidden = 0.1, 4096, 768
    mask = dropout_mask(draw_seed(), rows, hidden, p, torch.device(DEV))
    n = mask.numel()
    rate = mask.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    same = (mask[:, 1:] == mask[:, :-1]).double().mean().item()  # neighbours agree by chance
    assert abs(same - (p * p + (1 - p) ** 2)) < 0.005
    assert not torch.equal(mask[0], mask[1])
    other = dropout_mask(draw_seed(), rows, hidden, p, torch.device(DEV))
    assert (mask != other).double().mean().item() > 0.1


def test_dropout_is_reproducible_from_manual_seed():
    inputs = make((8, 16), 768, torch.float32)

    def forward():
        torch.manual_seed(5)
        return sln.skip_layer_norm(*inputs.values(), dropout=0.3, training=True)

    assert torch.equal(forward(), forward())


def test_backward_is_deterministic():
    inputs = make((4096,), 768, torch.bfloat16)
    upstream = torch.randn(4096, 768, device=DEV)
    first = run(sln.skip_layer_norm, inputs, upstream)[1]
    second = run(sln.skip_layer_norm, inputs, upstream)[1]
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_non_contiguous_inputs_are_copied():
    inputs = make((8, 16), 768, torch.float32)
    strided = {**inputs, "x": inputs["x"].transpose(0, 1).contiguous().transpose(0, 1)}
    assert not strided["x"].is_contiguous()
    got = sln.skip_layer_norm(*strided.values(), eps=EPS)
    torch.testing.assert_close(got, sln.skip_layer_norm(*inputs.values(), eps=EPS),
                               rtol=0, atol=0)


def test_wider_rows_and_float64_run_the_reference():
    for inputs in (make((2, 3), 5000, torch.float32),
                   {k: v.double() for k, v in make((2, 3), 64, torch.float32).items()}):
        inputs = {k: v.requires_grad_() for k, v in inputs.items()}
        out = sln.skip_layer_norm(*inputs.values())
        assert "SkipLayerNormFunction" not in type(out.grad_fn).__name__
        torch.testing.assert_close(out, reference.skip_layer_norm(*inputs.values()))


def test_use_kernels_false_runs_the_reference():
    inputs = {k: v.requires_grad_() for k, v in make((2, 3), 64, torch.float32).items()}
    with cuda.use_kernels(False):
        out = sln.skip_layer_norm(*inputs.values())
    assert "SkipLayerNormFunction" not in type(out.grad_fn).__name__
