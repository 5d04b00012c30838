"""Fused bias add + GELU (the feed-forward activation)."""

from bertrt.kernels.bias_gelu.reference import bias_gelu

__all__ = ["bias_gelu"]
