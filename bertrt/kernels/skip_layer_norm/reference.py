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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(x + bias) + skip) over the last axis.

    `mask` (bool, x's shape) replaces dropout's random draw with given keep decisions (kept
    elements scaled by 1 / (1 - dropout)), so a kernel's own mask can be checked against this
    reference; it applies only when dropout runs (`training` and `dropout > 0`).
    """
    if bias is not None:
        x = x + bias
    if training and dropout > 0.0:
        if mask is None:
            x = F.dropout(x, dropout, training=True)
        else:
            x = x * mask / (1.0 - dropout) if dropout < 1.0 else x * 0.0
    return F.layer_norm(x + skip, (x.shape[-1],), weight, beta, eps)
