"""Fused multi-head self-attention: QKV projections, scaled dot product, mask, softmax, context.

On CPU the reference is also the fast path: torch's fused scaled-dot-product kernel does the
attention, and three projections cost the same as one packed product at BERT's sizes (packing
per call costs a copy; caching a packed weight would go stale when an optimizer updates the
parameters through `.data` or a fused kernel, which no version counter sees).
"""

from bertrt.kernels.attention.reference import (
    attention,
    key_mask_bias,
    packed_attention,
    packed_layout,
    token_positions,
)

__all__ = ["attention", "key_mask_bias", "packed_attention", "packed_layout", "token_positions"]
