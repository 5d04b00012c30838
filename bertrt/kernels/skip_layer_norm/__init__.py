"""Fused residual add + LayerNorm (SkipLayerNorm)."""

from bertrt.kernels.skip_layer_norm.reference import skip_layer_norm

__all__ = ["skip_layer_norm"]
