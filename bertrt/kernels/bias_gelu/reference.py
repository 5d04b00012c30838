"""Pure-torch bias + GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias), exact erf form or the tanh approximation."""
    return F.gelu(x + bias, approximate=approximate)
