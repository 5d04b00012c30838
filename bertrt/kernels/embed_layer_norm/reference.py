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
) -> torch.Tensor:
    """dropout(LayerNorm(word[ids] + token_type[types] + position[0..S-1])): (B, S) -> (B, S, H)."""
    x = F.embedding(input_ids, word)
    if token_type_ids is None:
        x = x + token_type[0]
    else:
        x = x + F.embedding(token_type_ids, token_type)
    x = x + position[: input_ids.shape[1]]
    x = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return F.dropout(x, dropout, training=training) if dropout > 0.0 else x
