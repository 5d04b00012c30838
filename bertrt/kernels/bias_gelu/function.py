"""BiasGelu's autograd Function and its two implementations of the same explicit formulas.

`BiasGeluFunction.apply(x, bias, approximate, out_dtype, impl)`: `CUDA` launches the kernels
of `bias_gelu.cu`; `TORCH` writes the same formulas (the GELU derivatives spelled out) in torch
ops, which `torch.autograd.gradcheck` checks in float64. The backward recomputes x + bias from
the saved inputs; nothing else is stored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertrt.kernels import cuda

SOURCE = Path(__file__).with_name("bias_gelu.cu")
#: Threads per block of both kernels.
THREADS = 256
#: The forward's grid-stride loop needs no more blocks than this to fill any current GPU.
MAX_BLOCKS = 8192
#: Blocks the backward aims at in all (columns x row chunks); the row chunks depend on the
#: hidden size only, so the bias gradient's summation order is fixed: deterministic.
BACKWARD_TARGET_BLOCKS = 2048

_K = math.sqrt(2.0 / math.pi)
_A = 0.044715
FORMS = ("none", "tanh")


def _check_form(approximate: str) -> None:
    if approximate not in FORMS:
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


class TorchBiasGelu:
    """The kernels' formulas in torch ops, on any device and dtype (float64 for gradcheck)."""

    def forward(self, x, bias, *, approximate, out_dtype):
        acc = torch.promote_types(out_dtype, torch.float32)
        y = x.to(acc) + bias.to(acc)
        if approximate == "tanh":
            out = 0.5 * y * (1.0 + torch.tanh(_K * (y + _A * y ** 3)))
        else:
            out = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
        return out.to(out_dtype)

    def backward(self, grad, x, bias, *, approximate):
        acc = torch.promote_types(grad.dtype, torch.float32)
        y = x.to(acc) + bias.to(acc)
        if approximate == "tanh":
            t = torch.tanh(_K * (y + _A * y ** 3))
            slope = 0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * _K * (1.0 + 3.0 * _A * y * y)
        else:
            slope = (0.5 * (1.0 + torch.erf(y / math.sqrt(2.0)))
                     + y * torch.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi))
        dx = grad.to(acc) * slope
        return dx.to(x.dtype), dx.sum(0).to(bias.dtype)


class CudaBiasGelu:
    """The kernels of `bias_gelu.cu` on torch's current stream (contiguous CUDA rows)."""

    @staticmethod
    def _names(x_dtype, bias_dtype, out_dtype, vec: int) -> tuple[str, str]:
        args = ", ".join(cuda.ctype(d) for d in (x_dtype, bias_dtype, out_dtype))
        return f"bias_gelu_forward<{args}, {vec}>", f"bias_gelu_backward<{args}>"

    @staticmethod
    def _vector_width(x: torch.Tensor, out: torch.Tensor) -> int:
        """4 where every row splits into groups of 4 that x and out load and store aligned
        (x may be a view at an offset; bias is read element by element)."""
        hidden = x.shape[-1]
        aligned = all(t.data_ptr() % (4 * t.element_size()) == 0 for t in (x, out))
        return 4 if hidden % 4 == 0 and aligned else 1

    def forward(self, x, bias, *, approximate, out_dtype):
        rows, hidden = x.shape
        out = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
        vec = self._vector_width(x, out)
        groups = rows * hidden // vec
        names = self._names(x.dtype, bias.dtype, out_dtype, vec)
        cuda.launch(SOURCE, names[0], min(-(-groups // THREADS), MAX_BLOCKS), THREADS,
                    [cuda.pointer(x), cuda.pointer(bias), cuda.pointer(out),
                     np.int64(rows * hidden), np.int64(hidden),
                     np.int32(approximate == "tanh")],
                    device=x.device, name_expressions=names)
        return out

    def backward(self, grad, x, bias, *, approximate):
        rows, hidden = x.shape
        columns = -(-hidden // THREADS)
        chunks = min(rows, max(1, BACKWARD_TARGET_BLOCKS // columns), 65535)
        dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
        parts = torch.empty((chunks, hidden), dtype=torch.float32, device=x.device)
        names = self._names(x.dtype, bias.dtype, grad.dtype, 1)
        cuda.launch(SOURCE, names[1], (columns, chunks), THREADS,
                    [cuda.pointer(grad), cuda.pointer(x), cuda.pointer(bias), cuda.pointer(dx),
                     cuda.pointer(parts), np.int64(rows), np.int64(hidden),
                     np.int32(approximate == "tanh")],
                    device=x.device, name_expressions=names)
        return dx, parts.sum(0).to(bias.dtype)


TORCH = TorchBiasGelu()
CUDA = CudaBiasGelu()


class BiasGeluFunction(torch.autograd.Function):
    """gelu(x + bias) by `impl`'s explicit forward and backward; `approximate` is 'none'
    (erf) or 'tanh', `out_dtype` the output's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor, approximate: str,
                out_dtype: torch.dtype, impl: Any) -> torch.Tensor:
        _check_form(approximate)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (..., H) -> (rows, H)
        out = impl.forward(x2, bias, approximate=approximate, out_dtype=out_dtype)
        ctx.save_for_backward(x, bias)
        ctx.meta = (approximate, out_dtype, impl)
        return out.view(shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, bias = ctx.saved_tensors
        approximate, out_dtype, impl = ctx.meta
        shape = x.shape
        grad = grad.to(out_dtype).reshape(-1, shape[-1]).contiguous()
        dx, dbias = impl.backward(grad, x.reshape(-1, shape[-1]), bias,
                                  approximate=approximate)
        return dx.view(shape), dbias, None, None, None
