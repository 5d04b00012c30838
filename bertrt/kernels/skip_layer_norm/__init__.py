"""Fused dropout + bias + residual add + LayerNorm (SkipLayerNorm).

`skip_layer_norm` runs the CuPy kernels (`skip_layer_norm.cu`, through `SkipLayerNormFunction`)
when every tensor is on CUDA, CuPy imports, kernels are on (`bertrt.kernels.cuda`), the dtypes
are float32 / bfloat16 / float16 and hidden <= 4096; otherwise the pure-torch reference.
"""

from __future__ import annotations

import torch

from bertrt.kernels import cuda
from bertrt.kernels.skip_layer_norm import reference
from bertrt.kernels.skip_layer_norm.function import (
    CUDA,
    MAX_HIDDEN,
    SkipLayerNormFunction,
    draw_seed,
    dropout_mask,
)

__all__ = ["dropout_mask", "output_dtype", "skip_layer_norm"]


def output_dtype(*inputs: torch.Tensor | None) -> torch.dtype:
    """The dtype of a LayerNorm over the sum of `inputs` (None entries ignored), as the
    reference's torch ops decide it on CUDA: float32 under autocast (which runs layer_norm in
    float32), else the promoted dtype of the summed inputs. The LayerNorm's own weight and
    bias do not count: torch's layer_norm returns its input's dtype (bf16 with fp32 params)."""
    present = [t for t in inputs if t is not None]
    if torch.is_autocast_enabled(present[0].device.type):
        return torch.float32
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _kernel_takes(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    return (cuda.wants_kernel(x, *tensors) and x.numel() > 0 and x.shape[-1] <= MAX_HIDDEN
            and all(t.dtype in cuda.CTYPES for t in (x, *tensors) if t is not None))


def skip_layer_norm(
    x: torch.Tensor,
    skip: torch.Tensor,
    weight: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-12,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """LayerNorm(dropout(x + bias) + skip) over the last axis: (..., H) -> (..., H).

    On the kernel path the output dtype is `output_dtype(x, skip, bias)`, what the reference
    returns; non-contiguous inputs are copied to contiguous ones first. Dropout draws a
    63-bit Philox seed from torch's default CPU generator per call, so `torch.manual_seed`
    makes it reproducible.
    """
    if not _kernel_takes(x, skip, weight, beta, bias):
        return reference.skip_layer_norm(x, skip, weight, beta, bias, eps=eps, dropout=dropout,
                                         training=training)
    if x.shape != skip.shape:
        raise ValueError(f"skip_layer_norm: x {tuple(x.shape)} and skip {tuple(skip.shape)} "
                         "differ in shape")
    for name, t in (("weight", weight), ("beta", beta), ("bias", bias)):
        if t is not None and t.shape != x.shape[-1:]:
            raise ValueError(f"skip_layer_norm: {name} has shape {tuple(t.shape)}, expected "
                             f"({x.shape[-1]},)")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"skip_layer_norm: dropout must be in [0, 1], got {dropout}")
    p = float(dropout) if training else 0.0
    seed = draw_seed() if p > 0.0 else 0
    tensors = [None if t is None else t.contiguous() for t in (x, skip, weight, beta, bias)]
    if not torch.is_grad_enabled():  # nothing saved for a backward that cannot come
        tensors = [None if t is None else t.detach() for t in tensors]
    return SkipLayerNormFunction.apply(*tensors, float(eps), p, seed,
                                       output_dtype(x, skip, bias), CUDA)
