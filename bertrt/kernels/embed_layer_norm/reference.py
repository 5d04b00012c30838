"""Pure-torch embeddings sum + LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_layer_norm(
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    word: torch.Tensor,
    position: torch.Tensor,
    token_type: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    eps: float = 1e-12,
    dropout: float = 0.0,
    training: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """dropout(LayerNorm(word[ids] + token_type[types] + position[0..S-1])): (B, S) -> (B, S, H).

    `mask` (bool, (B, S, H)) replaces dropout's random draw with given keep decisions (kept
    elements scaled by 1 / (1 - dropout)), so a kernel's own mask can be checked against this
    reference; it applies only when dropout runs (`training` and `dropout > 0`).
    """
    x = F.embedding(input_ids, word)
    if token_type_ids is None:
        x = x + token_type[0]
    else:
        x = x + F.embedding(token_type_ids, token_type)
    x = x + position[: input_ids.shape[1]]
    x = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if not (training and dropout > 0.0):
        return x
    if mask is None:
        return F.dropout(x, dropout, training=True)
    return x * mask / (1.0 - dropout) if dropout < 1.0 else x * 0.0
