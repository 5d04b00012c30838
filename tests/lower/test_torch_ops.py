"""Every op's torch lowering against an independent float64 numpy reference, forward and
gradient (gradients against float64 finite differences via torch.autograd.gradcheck on the
float64 path). `REFERENCES` must name every op of the registry (tests/graph/test_registry.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from bertrt.lower.to_torch import TORCH_OPS

RNG = np.random.default_rng(0)
B, S, H, N = 2, 5, 8, 2
D = H // N


def _f(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _mask_bias(mask):
    return (1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min


def _attention(x, wq, bq, wk, bk, wv, bv, mask_bias, heads, scale):
    def split(t):
        return t.reshape(B, S, heads, -1).transpose(0, 2, 1, 3)

    q, k, v = (split(x @ w.T + b) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    p = _softmax(q @ k.transpose(0, 1, 3, 2) * scale + mask_bias)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, S, H)


IDS = RNG.integers(0, 11, (B, S))
CU = np.array([0, 3, 4, 9], dtype=np.int32)  # packed: three sequences of 3, 1 and 5 tokens
T = int(CU[-1])


def _packed_attention(x, wq, bq, wk, bk, wv, bv, cu, heads, scale):
    out = np.empty_like(x)
    for a, b in zip(cu[:-1], cu[1:]):  # each sequence on its own, no mask
        q, k, v = ((x[a:b] @ w.T + c).reshape(b - a, heads, -1).transpose(1, 0, 2)
                   for w, c in ((wq, bq), (wk, bk), (wv, bv)))
        p = _softmax(q @ k.transpose(0, 2, 1) * scale)
        out[a:b] = (p @ v).transpose(1, 0, 2).reshape(b - a, -1)
    return out

TYPES = RNG.integers(0, 2, (B, S))
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

# op -> (inputs, attrs, numpy reference); float inputs get gradients checked
Case = tuple[list, dict, Callable[..., np.ndarray]]
REFERENCES: dict[str, Case] = {
    "GATHER": ([_f(11, H), IDS], {}, lambda t, i: t[i]),
    "POSITION_IDS": ([IDS], {}, lambda i: np.arange(i.shape[1])),
    "ADD": ([_f(B, S, H), _f(S, H)], {}, lambda a, b: a + b),
    "SCALE": ([_f(B, S, H)], {"factor": 0.3}, lambda x: x * 0.3),
    "LAYER_NORM": ([_f(B, S, H), _f(H), _f(H)], {"eps": 1e-5},
                   lambda x, w, b: _ln(x, w, b, 1e-5)),
    "LINEAR": ([_f(B, S, H), _f(3, H), _f(3)], {}, lambda x, w, b: x @ w.T + b),
    "GELU": ([_f(B, S, H)], {"approximate": "none"}, _gelu),
    "RELU": ([_f(B, S, H)], {}, lambda x: np.maximum(x, 0)),
    "SILU": ([_f(B, S, H)], {}, lambda x: x / (1 + np.exp(-x))),
    "TANH": ([_f(B, H)], {}, np.tanh),
    "DROPOUT": ([_f(B, S, H)], {"p": 0.1}, lambda x: x),  # inference: identity
    "SOFTMAX": ([_f(B, N, S, S), MASK], {"axis": -1},
                lambda x, m: _softmax(x + _mask_bias(m))),
    "MASK_INDEX": ([MASK], {}, lambda m: m.sum(1)),
    "PACKED_POSITIONS": ([CU, RNG.integers(0, 11, T)], {},
                         lambda cu, ids: np.array([0, 1, 2, 0, 0, 1, 2, 3, 4])),
    "FIRST_TOKENS": ([_f(T, H), CU], {}, lambda x, cu: x[[0, 3, 4]]),
    "PACKED_ATTENTION": (
        [_f(T, H), _f(H, H), _f(H), _f(H, H), _f(H), _f(H, H), _f(H), CU],
        {"heads": N, "scale": 1 / math.sqrt(D)},
        lambda *a: _packed_attention(*a, heads=N, scale=1 / math.sqrt(D))),
    "SPLIT_HEADS": ([_f(B, S, H)], {"heads": N},
                    lambda x: x.reshape(B, S, N, D).transpose(0, 2, 1, 3)),
    "MERGE_HEADS": ([_f(B, N, S, D)], {}, lambda x: x.transpose(0, 2, 1, 3).reshape(B, S, H)),
    "MATMUL": ([_f(B, N, S, D), _f(B, N, S, D)], {"transpose_b": True},
               lambda a, b: a @ b.transpose(0, 1, 3, 2)),
    "SELECT_TOKEN": ([_f(B, S, H)], {"index": 0}, lambda x: x[:, 0]),
    "SELECT_LAST": ([_f(B, S, 2)], {"index": 1}, lambda x: x[..., 1]),
    "GATHER_ROWS": ([_f(B, S, H), np.array([0, 7, 3])], {},
                    lambda x, i: x.reshape(B * S, H)[i]),
    "EMBED_LAYER_NORM": (
        [IDS, TYPES, _f(11, H), _f(S + 2, H), _f(2, H), _f(H), _f(H)], {"eps": 1e-6},
        lambda i, t, w, p, tt, g, b: _ln(w[i] + tt[t] + p[: i.shape[1]], g, b, 1e-6)),
    "SKIP_LAYER_NORM": ([_f(B, S, H), _f(B, S, H), _f(H), _f(H), _f(H)], {"eps": 1e-6},
                        lambda x, s, g, b, bias: _ln(x + bias + s, g, b, 1e-6)),
    "BIAS_GELU": ([_f(B, S, H), _f(H)], {"approximate": "tanh"},
                  lambda x, b: _gelu(x + b, "tanh")),
    "ATTENTION": (
        [_f(B, S, H), _f(H, H), _f(H), _f(H, H), _f(H), _f(H, H), _f(H), MASK],
        {"heads": N, "scale": 1 / math.sqrt(D)},
        lambda *a: _attention(*a[:7], _mask_bias(a[7]), heads=N, scale=1 / math.sqrt(D))),
}

# inputs that are constants, not differentiable (beyond the integer ones)
_NO_GRAD: set[tuple[str, int]] = set()


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if np.issubdtype(a.dtype, np.integer):
        return torch.as_tensor(a, dtype=torch.long)
    return torch.as_tensor(a, dtype=dtype)


def _call(op: str, inputs: list[torch.Tensor], attrs: dict) -> torch.Tensor:
    entry = TORCH_OPS[op]
    kwargs = dict(attrs)
    if entry.training:
        kwargs["training"] = False
    return entry.fn(*inputs, **kwargs)


@pytest.mark.parametrize("op", sorted(REFERENCES))
def test_forward_matches_float64_reference(op):
    inputs, attrs, ref = REFERENCES[op]
    got = _call(op, [_to_torch(a, torch.float32) for a in inputs], attrs)
    want = ref(*inputs)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", sorted(op for op, (ins, _, _) in REFERENCES.items()
                                      if any(np.issubdtype(a.dtype, np.floating) for a in ins)))
def test_gradient_matches_finite_differences(op):
    inputs, attrs, _ = REFERENCES[op]
    tensors = []
    for i, a in enumerate(inputs):
        t = _to_torch(a, torch.float64)
        if t.is_floating_point() and (op, i) not in _NO_GRAD:
            t.requires_grad_(True)
        tensors.append(t)
    grad_inputs = [t for t in tensors if t.requires_grad]

    def fn(*diff):
        it = iter(diff)
        full = [next(it) if t.requires_grad else t for t in tensors]
        return _call(op, full, attrs)

    assert torch.autograd.gradcheck(fn, tuple(grad_inputs), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("op", ["SOFTMAX", "ATTENTION"])
def test_key_lengths_mask_like_the_right_padded_mask(op):
    """A key mask given as int32 (B,) lengths (what MASK_INDEX makes) masks as the (B, S) mask;
    absent, every key is attended."""
    inputs, attrs, ref = REFERENCES[op]
    tensors = [_to_torch(a, torch.float64) for a in inputs]
    lengths = torch.as_tensor(MASK.sum(1), dtype=torch.int32)
    with_lengths = _call(op, [*tensors[:-1], lengths], attrs)
    np.testing.assert_allclose(with_lengths.numpy(), ref(*inputs), rtol=1e-10, atol=1e-12)
    unmasked = _call(op, [*tensors[:-1], None], attrs)
    np.testing.assert_allclose(unmasked.numpy(), ref(*inputs[:-1], np.ones_like(MASK)),
                               rtol=1e-10, atol=1e-12)


def test_dropout_acts_only_in_training():
    x = torch.ones(1000)
    entry = TORCH_OPS["DROPOUT"]
    assert torch.equal(entry.fn(x, p=0.5, training=False), x)
    y = entry.fn(x, p=0.5, training=True)
    assert 300 < int((y == 0).sum()) < 700
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 2.0))
