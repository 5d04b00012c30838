"""Fused multi-head self-attention: QKV projections, scaled dot product, mask, softmax, context."""

from bertrt.kernels.attention.reference import attention

__all__ = ["attention"]
