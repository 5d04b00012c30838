"""Pure-torch residual add + LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """LayerNorm(dropout(x + bias) + skip) over the last axis."""
    if bias is not None:
        x = x + bias
    if training and dropout > 0.0:
        x = F.dropout(x, dropout, training=True)
    return F.layer_norm(x + skip, (x.shape[-1],), weight, beta, eps)
