"""SkipLayerNorm's autograd Function and its two implementations of the same explicit formulas.

`SkipLayerNormFunction.apply(x, skip, weight, beta, bias, eps, p, seed, out_dtype, impl)` runs
`impl.forward` and `impl.backward` on (rows, hidden) views. `CUDA` launches the kernels of
`skip_layer_norm.cu`; `TORCH` writes the same formulas in torch ops, so that
`torch.autograd.gradcheck` in float64 (on CPU) checks the backward formulas the kernel
implements.

Saved for the backward: the pre-norm sum `dropout(x + bias) + skip` (in the output dtype, as
the unfused graph keeps its residual add for LayerNorm's backward) and fp32 (mean, rstd) per
row, plus the seed. The sum is one tensor of the output's size and gives x_hat without dividing
by the weight (recovering x_hat from the output would, and breaks where weight is ~0); x and
skip would be two tensors. The dropout mask is not stored: the backward regenerates it from
the seed (`dropout_keep(seed, row * hidden + col, p)`, Philox).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertrt.kernels import cuda

SOURCE = Path(__file__).with_name("skip_layer_norm.cu")
#: Widest row the kernels take: 4 columns per thread, at most 1024 threads per row.
MAX_HIDDEN = 4096
#: Blocks of the backward (each loops over rows and leaves one partial sum per column). A
#: fixed count fixes the order of the column sums: the gradients are deterministic.
BACKWARD_BLOCKS = 1024


def row_block(hidden: int) -> int:
    """Threads per row of a LayerNorm kernel: ceil(hidden / 4) rounded up to a warp."""
    if not 0 < hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden}: the LayerNorm kernels take 1..{MAX_HIDDEN}")
    return (-(-hidden // 4) + 31) // 32 * 32


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator: no device sync, and
    `torch.manual_seed` (or a checkpoint's saved RNG state) governs it."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def dropout_mask(seed: int, rows: int, hidden: int, p: float,
                 device: torch.device) -> torch.Tensor:
    """The (rows, hidden) bool keep mask a kernel call with `seed` and `p` applies (CUDA)."""
    out = torch.empty((rows, hidden), dtype=torch.uint8, device=device)
    n = rows * hidden
    if n:
        cuda.launch(SOURCE, "dropout_mask", min(-(-n // 256), 65536), 256,
                    [cuda.pointer(out), np.int64(n), np.float32(p), np.uint64(seed)],
                    device=device)
    return out.bool()


def torch_keep_mask(seed: int, shape: tuple[int, ...], p: float,
                    device: torch.device) -> torch.Tensor:
    """The torch implementations' keep mask: as the kernel's, a pure function of the seed
    (another random stream than Philox; only the formulas around it must agree)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def dropout_scale(p: float) -> float:
    """What a kept element is multiplied by (0 when nothing is kept)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16; float64 stays float64 (the gradcheck case)."""
    return torch.promote_types(dtype, torch.float32)


class TorchSkipLayerNorm:
    """The kernels' formulas in torch ops, on any device and dtype (float64 for gradcheck)."""

    def forward(self, x, skip, weight, beta, bias, *, eps, p, seed, out_dtype, save):
        acc = accumulation_dtype(out_dtype)
        a = x.to(acc)
        if bias is not None:
            a = a + bias.to(acc)
        if p > 0.0:
            a = a * torch_keep_mask(seed, tuple(a.shape), p, a.device) * dropout_scale(p)
        total = (a + skip.to(acc)).to(out_dtype).to(acc)  # rounded as the kernel stores it
        mean = total.mean(-1)
        rstd = torch.rsqrt(((total - mean[:, None]) ** 2).mean(-1) + eps)
        y = (total - mean[:, None]) * rstd[:, None] * weight.to(acc) + beta.to(acc)
        if not save:
            return y.to(out_dtype), None, None, None
        return y.to(out_dtype), total.to(out_dtype), mean, rstd

    def backward(self, grad, total, mean, rstd, weight, *, p, seed, dtypes):
        x_dtype, skip_dtype, weight_dtype, beta_dtype, bias_dtype = dtypes
        acc = mean.dtype
        dy = grad.to(acc)
        x_hat = (total.to(acc) - mean[:, None]) * rstd[:, None]
        g = dy * weight.to(acc)
        ds = rstd[:, None] * (g - g.mean(-1, keepdim=True)
                              - x_hat * (g * x_hat).mean(-1, keepdim=True))
        dx = ds
        if p > 0.0:
            dx = ds * torch_keep_mask(seed, tuple(ds.shape), p, ds.device) * dropout_scale(p)
        dbias = None if bias_dtype is None else dx.sum(0).to(bias_dtype)
        return (dx.to(x_dtype), ds.to(skip_dtype), (dy * x_hat).sum(0).to(weight_dtype),
                dy.sum(0).to(beta_dtype), dbias)


class CudaSkipLayerNorm:
    """The kernels of `skip_layer_norm.cu` on torch's current stream (contiguous CUDA rows)."""

    @staticmethod
    def _names(x_dtype, skip_dtype, param_dtype, out_dtype) -> tuple[str, str]:
        args = ", ".join(cuda.ctype(d) for d in (x_dtype, skip_dtype, param_dtype, out_dtype))
        return f"skip_layer_norm_forward<{args}>", f"skip_layer_norm_backward<{args}>"

    def forward(self, x, skip, weight, beta, bias, *, eps, p, seed, out_dtype, save):
        rows, hidden = x.shape
        beta = beta.to(weight.dtype)
        bias = None if bias is None else bias.to(weight.dtype)
        out = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
        total = torch.empty_like(out) if save else None
        mean = torch.empty(rows, dtype=torch.float32, device=x.device) if save else None
        rstd = torch.empty_like(mean) if save else None
        names = self._names(x.dtype, skip.dtype, weight.dtype, out_dtype)
        cuda.launch(SOURCE, names[0], rows, row_block(hidden),
                    [cuda.pointer(t) for t in (x, skip, weight, beta, bias, out, total, mean,
                                                rstd)]
                    + [np.int64(hidden), np.float32(eps), np.float32(p), np.uint64(seed)],
                    device=x.device, name_expressions=names)
        return out, total, mean, rstd

    def backward(self, grad, total, mean, rstd, weight, *, p, seed, dtypes):
        x_dtype, skip_dtype, weight_dtype, beta_dtype, bias_dtype = dtypes
        rows, hidden = grad.shape
        blocks = min(rows, BACKWARD_BLOCKS)
        dx = torch.empty((rows, hidden), dtype=x_dtype, device=grad.device)
        dskip = torch.empty((rows, hidden), dtype=skip_dtype, device=grad.device)
        # (dweight, dbeta[, dbias]) partial column sums, one row per block: (k, blocks, H)
        parts = torch.empty((2 if bias_dtype is None else 3, blocks, hidden),
                            dtype=torch.float32, device=grad.device)
        names = self._names(x_dtype, skip_dtype, weight.dtype, total.dtype)
        cuda.launch(SOURCE, names[1], blocks, row_block(hidden),
                    [cuda.pointer(t) for t in (grad, total, mean, rstd, weight, dx, dskip,
                                                parts[0], parts[1])]
                    + [cuda.pointer(parts[2]) if bias_dtype is not None else cuda.pointer(None),
                       np.int64(rows), np.int64(hidden), np.float32(p), np.uint64(seed)],
                    device=grad.device, name_expressions=names)
        sums = parts.sum(1)  # (k, H), a fixed order
        dbias = None if bias_dtype is None else sums[2].to(bias_dtype)
        return dx, dskip, sums[0].to(weight_dtype), sums[1].to(beta_dtype), dbias


TORCH = TorchSkipLayerNorm()
CUDA = CudaSkipLayerNorm()


class SkipLayerNormFunction(torch.autograd.Function):
    """LayerNorm(dropout(x + bias) + skip) over the last axis, by `impl`'s explicit forward and
    backward. `p` is the dropout probability (0: none), `seed` its Philox key, `out_dtype`
    the output's dtype (see `bertrt.kernels.skip_layer_norm.output_dtype`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                beta: torch.Tensor, bias: torch.Tensor | None, eps: float, p: float, seed: int,
                out_dtype: torch.dtype, impl: Any) -> torch.Tensor:
        shape, hidden = x.shape, x.shape[-1]
        save = any(ctx.needs_input_grad[:5])
        # (..., H) -> (rows, H)
        out, total, mean, rstd = impl.forward(
            x.reshape(-1, hidden), skip.reshape(-1, hidden), weight, beta, bias, eps=eps, p=p,
            seed=seed, out_dtype=out_dtype, save=save)
        if save:
            ctx.save_for_backward(total, mean, rstd, weight)
            ctx.meta = (shape, p, seed, impl, (x.dtype, skip.dtype, weight.dtype, beta.dtype,
                                               None if bias is None else bias.dtype))
        return out.view(shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        total, mean, rstd, weight = ctx.saved_tensors
        shape, p, seed, impl, dtypes = ctx.meta
        grad = grad.to(total.dtype).reshape(-1, shape[-1]).contiguous()
        dx, dskip, dweight, dbeta, dbias = impl.backward(grad, total, mean, rstd, weight, p=p,
                                                         seed=seed, dtypes=dtypes)
        return dx.view(shape), dskip.view(shape), dweight, dbeta, dbias, None, None, None, \
            None, None
