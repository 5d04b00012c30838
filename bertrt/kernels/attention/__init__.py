"""Fused multi-head self-attention: QKV projections, scaled dot product, mask, softmax, context.

`attention` is the public entry: on CPU (and until the CUDA kernel lands, everywhere) it runs
the packed-QKV path, which `tests/kernels` checks against `reference.attention`.
"""

from bertrt.kernels.attention.packed import packed_attention as attention
from bertrt.kernels.attention.reference import attention as reference

__all__ = ["attention", "reference"]
