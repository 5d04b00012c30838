"""Fused word + position + token-type embeddings and LayerNorm (EmbedLayerNorm)."""

from bertrt.kernels.embed_layer_norm.reference import embed_layer_norm

__all__ = ["embed_layer_norm"]
