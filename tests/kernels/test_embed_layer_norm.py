"""EmbedLayerNorm's reference against the gathers, sum and LayerNorm written out, forward and
backward (into all three tables), with and without token type ids."""

from __future__ import annotations

import pytest
import torch

from bertrt.kernels.embed_layer_norm.reference import embed_layer_norm

EPS = 1e-3
B, S, H, VOCAB, POSITIONS, TYPES = 3, 6, 16, 11, 9, 3  # more positions than S: a slice


def embeddings_sum(input_ids, token_type_ids, word, position, token_type):
    """word[id] + position[s] + token_type[type]: (B, S) -> (B, S, H)."""
    if token_type_ids is None:  # every token has type 0
        token_type_ids = torch.zeros_like(input_ids)
    positions = torch.arange(input_ids.shape[1])
    return word[input_ids] + position[positions] + token_type[token_type_ids]


@pytest.mark.parametrize("with_types", [True, False], ids=["types", "no-types"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_embed_layer_norm_matches_unfused(with_types, training, matches_unfused, make_randn,
                                          unfused_layer_norm):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    ids[0, :3] = 4  # a repeated id: its table row gathers several gradients
    types = torch.randint(0, TYPES, (B, S), generator=gen) if with_types else None
    inputs = {"word": make_randn(VOCAB, H, seed=1), "position": make_randn(POSITIONS, H, seed=2),
              "token_type": make_randn(TYPES, H, seed=3),
              "weight": 1.0 + 0.2 * make_randn(H, seed=4), "bias": make_randn(H, seed=5)}

    def fused(**t):
        return embed_layer_norm(ids, types, t["word"], t["position"], t["token_type"],
                                t["weight"], t["bias"], eps=EPS, dropout=0.0, training=training)

    def unfused(word, position, token_type, weight, bias):
        x = embeddings_sum(ids, types, word, position, token_type)
        return unfused_layer_norm(x, weight, bias, EPS)

    matches_unfused(fused, unfused, inputs)
