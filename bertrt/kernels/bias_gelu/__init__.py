"""Fused bias add + GELU (the feed-forward activation).

`bias_gelu` runs the CuPy kernels (`bias_gelu.cu`, through `BiasGeluFunction`) when both
tensors are on CUDA, CuPy imports, kernels are on (`bertrt.kernels.cuda`) and the dtypes are
float32 / bfloat16 / float16; otherwise the pure-torch reference.
"""

from __future__ import annotations

import torch

from bertrt.kernels import cuda
from bertrt.kernels.bias_gelu import reference
from bertrt.kernels.bias_gelu.function import CUDA, BiasGeluFunction, _check_form

__all__ = ["bias_gelu"]


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias), exact erf form or the tanh approximation: (..., H) -> (..., H).

    On the kernel path the output dtype is that of x + bias (GELU is not on autocast's lists,
    so autocast changes nothing: bf16 x with an fp32 bias gives float32, as the reference);
    a non-contiguous x is copied to a contiguous one first.
    """
    if not (cuda.wants_kernel(x, bias) and x.numel() > 0
            and x.dtype in cuda.CTYPES and bias.dtype in cuda.CTYPES):
        return reference.bias_gelu(x, bias, approximate=approximate)
    _check_form(approximate)
    if bias.shape != x.shape[-1:]:
        raise ValueError(f"bias_gelu: bias has shape {tuple(bias.shape)}, expected "
                         f"({x.shape[-1]},)")
    return BiasGeluFunction.apply(x.contiguous(), bias.contiguous(), approximate,
                                  torch.promote_types(x.dtype, bias.dtype), CUDA)
