"""The EmbedLayerNorm CUDA kernels against the float64 reference, forward and backward (the
LayerNorm's weight and bias, and the three tables' gradients), on fp32/bf16/fp16 tables and
fp32 tables with low-precision autocast, edge shapes, dropout and strided ids.

The bound: a kernel's error against float64 is at most twice that of torch's own ops on the
same low-precision inputs, plus a small floor relative to the values' scale. Skipped without
CuPy or CUDA.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("cupy")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from bertrt.kernels import cuda  # noqa: E402
from bertrt.kernels.embed_layer_norm import reference  # noqa: E402
from bertrt.kernels.skip_layer_norm.function import draw_seed, dropout_mask  # noqa: E402

eln = importlib.import_module("bertrt.kernels.embed_layer_norm")

EPS = 1e-3
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(FLOOR)
DEV = "cuda"
NAMES = ("word", "position", "token_type", "weight", "bias")


def assert_close_to_exact(name, got, low, exact, dtype):
    """`got` (kernel) is within 2x the error of `low` (torch's ops in `dtype`) of `exact`."""
    assert got.dtype == low.dtype and got.shape == exact.shape, name
    scale = max(1.0, exact.abs().max().item())
    err = (got.double() - exact).abs().max().item()
    base = (low.double() - exact).abs().max().item()
    assert err <= 2 * base + FLOOR[dtype] * scale, \
        f"{name}: kernel error {err:.3g}, torch's {base:.3g} (scale {scale:.3g})"


def make(batch, seq, hidden, dtype, *, vocab=1000, positions=512, types=2, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen, device=DEV)
    ids[0, : min(seq, 3)] = 7  # a repeated id
    type_ids = torch.randint(0, types, (batch, seq), generator=gen, device=DEV)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=gen, device=DEV) * scale + shift).to(dtype)

    tables = {"word": r(vocab, hidden), "position": r(positions, hidden),
              "token_type": r(types, hidden), "weight": r(hidden, scale=0.2, shift=1.0),
              "bias": r(hidden)}
    return ids, type_ids, tables


def run(fn, ids, types, tables, upstream, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tables.items()}
    out = fn(ids, types, *leaves.values(), eps=EPS, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), upstream.to(out.dtype))
    return out, dict(zip(leaves, grads))


def check(ids, types, tables, dtype, *, dropout=0.0, seed=0, name=""):
    batch, seq = ids.shape
    hidden = tables["word"].shape[1]
    upstream = torch.randn(batch, seq, hidden, device=DEV,
                           generator=torch.Generator(DEV).manual_seed(9))
    torch.manual_seed(seed)
    got, g_got = run(eln.embed_layer_norm, ids, types, tables, upstream, dropout=dropout,
                     training=dropout > 0)
    assert "EmbedLayerNormFunction" in type(got.grad_fn).__name__, "the kernel did not run"
    mask = None
    if dropout > 0:
        torch.manual_seed(seed)
        mask = dropout_mask(draw_seed(), batch * seq, hidden, dropout, ids.device)
        mask = mask.view(batch, seq, hidden)
        assert torch.equal(got == 0, ~mask), "dropped elements are the mask's zeros"
    kw = dict(dropout=dropout, training=dropout > 0, mask=mask)
    low, g_low = run(reference.embed_layer_norm, ids, types, tables, upstream, **kw)
    exact, g_exact = run(reference.embed_layer_norm, ids, types,
                         {k: v.double() for k, v in tables.items()}, upstream.double(), **kw)
    assert_close_to_exact(f"{name} out", got, low, exact, dtype)
    for k in NAMES:
        assert g_got[k].dtype == tables[k].dtype, k
        assert_close_to_exact(f"{name} d{k}", g_got[k], g_low[k], g_exact[k], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [128, 384, 768, 1024, 1000, 4096])
def test_hidden_sizes(hidden, dtype):
    check(*make(4, 33, hidden, dtype), dtype, name=f"h{hidden}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_token_types_and_one_token(dtype):
    ids, _, tables = make(3, 16, 768, dtype)
    check(ids, None, tables, dtype, name="no types")
    ids, types, tables = make(1, 1, 768, dtype)
    check(ids, types, tables, dtype, name="1 token")


def test_many_rows():
    """>= 65,536 tokens (batch 512 x seq 128): 64-bit offsets, the backward's row loop."""
    check(*make(512, 128, 256, torch.bfloat16, vocab=30522), torch.bfloat16, name="65536 rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_uses_the_mask_it_reports(p, dtype):
    check(*make(8, 64, 768, dtype), dtype, dropout=p, seed=3, name=f"p={p}")


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_tables_under_autocast(low):
    ids, types, tables = make(4, 64, 768, torch.float32)
    with torch.autocast("cuda", dtype=low):
        got = eln.embed_layer_norm(ids, types, *tables.values(), eps=EPS)
        want = reference.embed_layer_norm(ids, types, *tables.values(), eps=EPS)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_backward_is_deterministic():
    ids, types, tables = make(64, 128, 768, torch.float32, vocab=100)  # many repeats
    upstream = torch.randn(64, 128, 768, device=DEV)
    first = run(eln.embed_layer_norm, ids, types, tables, upstream)[1]
    second = run(eln.embed_layer_norm, ids, types, tables, upstream)[1]
    for k in NAMES:
        assert torch.equal(first[k], second[k]), k


def test_strided_and_int32_ids_are_accepted():
    ids, types, tables = make(8, 16, 768, torch.float32)
    strided = ids.t().contiguous().t()
    assert not strided.is_contiguous()
    want = eln.embed_layer_norm(ids, types, *tables.values())
    torch.testing.assert_close(eln.embed_layer_norm(strided, types, *tables.values()), want,
                               rtol=0, atol=0)
    torch.testing.assert_close(eln.embed_layer_norm(ids.int(), types.int(), *tables.values()),
                               want, rtol=0, atol=0)


def test_a_sequence_longer_than_the_position_table_is_refused():
    ids, types, tables = make(2, 16, 128, torch.float32, positions=8)
    with pytest.raises(ValueError, match="exceeds the position table's 8 rows"):
        eln.embed_layer_norm(ids, types, *tables.values())


def test_use_kernels_false_runs_the_reference():
    ids, types, tables = make(2, 8, 64, torch.float32)
    tables = {k: v.requires_grad_() for k, v in tables.items()}
    with cuda.use_kernels(False):
        out = eln.embed_layer_norm(ids, types, *tables.values())
    assert "EmbedLayerNormFunction" not in type(out.grad_fn).__name__
