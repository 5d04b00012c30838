"""EmbedLayerNorm's autograd Function and its two implementations of the same explicit formulas.

`EmbedLayerNormFunction.apply(ids, types, word, position, token_type, weight, bias, eps, p,
seed, out_dtype, impl)` with (B, S) ids: `CUDA` launches the kernels of `embed_layer_norm.cu`;
`TORCH` writes the same formulas in torch ops, which `torch.autograd.gradcheck` checks in
float64.

Saved for the backward: (mean, rstd) per token and the seed; the embeddings sum is re-gathered
from the tables (three row reads per token, cheaper than keeping a (B, S, H) tensor).

The tables' gradients are segment sums of d sum (the gradient at the embeddings sum, fp32) by
id. They go through torch's own embedding backward (`aten.embedding_dense_backward`), which
sorts the ids and sums each segment in a fixed order on CUDA: deterministic, and without the
contention of float atomics on the token-type table's two rows (every token adds into one of
them). Positions are 0..S-1 in every sequence, so their gradient is a plain sum over the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertrt.kernels import cuda
from bertrt.kernels.skip_layer_norm.function import (
    BACKWARD_BLOCKS,
    accumulation_dtype,
    dropout_scale,
    row_block,
    torch_keep_mask,
)

SOURCE = Path(__file__).with_name("embed_layer_norm.cu")


def table_grads(dsum: torch.Tensor, ids: torch.Tensor, types: torch.Tensor | None, seq: int,
                word: torch.Tensor, position: torch.Tensor,
                token_type: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three tables' gradients from d sum (rows, H), rows = B * S tokens in order."""
    rows, hidden = dsum.shape
    dword = torch.ops.aten.embedding_dense_backward(dsum, ids, word.shape[0], -1, False)
    dposition = dsum.new_zeros(position.shape)
    dposition[:seq] = dsum.view(rows // seq, seq, hidden).sum(0)  # (B, S, H) -> (S, H)
    if types is None:  # every token has type 0
        dtype = dsum.new_zeros(token_type.shape)
        dtype[0] = dsum.sum(0)
    else:
        dtype = torch.ops.aten.embedding_dense_backward(dsum, types, token_type.shape[0], -1,
                                                        False)
    return dword.to(word.dtype), dposition.to(position.dtype), dtype.to(token_type.dtype)


class TorchEmbedLayerNorm:
    """The kernels' formulas in torch ops, on any device and dtype (float64 for gradcheck)."""

    @staticmethod
    def _sum(ids, types, seq, word, position, token_type, acc):
        rows = ids.shape[0]
        pos = torch.arange(rows, device=ids.device) % seq
        type_rows = token_type[0].expand(rows, -1) if types is None else token_type[types]
        return word[ids].to(acc) + position[pos].to(acc) + type_rows.to(acc)

    def forward(self, ids, types, seq, word, position, token_type, weight, bias, *, eps, p,
                seed, out_dtype, save):
        acc = accumulation_dtype(out_dtype)
        v = self._sum(ids, types, seq, word, position, token_type, acc)
        mean = v.mean(-1)
        rstd = torch.rsqrt(((v - mean[:, None]) ** 2).mean(-1) + eps)
        y = (v - mean[:, None]) * rstd[:, None] * weight.to(acc) + bias.to(acc)
        if p > 0.0:
            y = y * torch_keep_mask(seed, tuple(y.shape), p, y.device) * dropout_scale(p)
        return y.to(out_dtype), (mean, rstd) if save else (None, None)

    def backward(self, grad, ids, types, seq, word, position, token_type, weight, mean, rstd,
                 *, p, seed, bias_dtype):
        acc = mean.dtype
        dn = grad.to(acc)
        if p > 0.0:
            dn = dn * torch_keep_mask(seed, tuple(dn.shape), p, dn.device) * dropout_scale(p)
        v = self._sum(ids, types, seq, word, position, token_type, acc)
        x_hat = (v - mean[:, None]) * rstd[:, None]
        g = dn * weight.to(acc)
        dsum = rstd[:, None] * (g - g.mean(-1, keepdim=True)
                                - x_hat * (g * x_hat).mean(-1, keepdim=True))
        return (*table_grads(dsum, ids, types, seq, word, position, token_type),
                (dn * x_hat).sum(0).to(weight.dtype), dn.sum(0).to(bias_dtype))


class CudaEmbedLayerNorm:
    """The kernels of `embed_layer_norm.cu` on torch's current stream (contiguous CUDA
    tensors, int64 ids)."""

    @staticmethod
    def _names(table_dtype, param_dtype, out_dtype) -> tuple[str, str]:
        args = ", ".join(cuda.ctype(d) for d in (table_dtype, param_dtype, out_dtype))
        return f"embed_layer_norm_forward<{args}>", f"embed_layer_norm_backward<{args}>"

    def forward(self, ids, types, seq, word, position, token_type, weight, bias, *, eps, p,
                seed, out_dtype, save):
        rows, hidden = ids.shape[0], word.shape[1]
        position, token_type = position.to(word.dtype), token_type.to(word.dtype)
        bias = bias.to(weight.dtype)
        out = torch.empty((rows, hidden), dtype=out_dtype, device=ids.device)
        mean = torch.empty(rows, dtype=torch.float32, device=ids.device) if save else None
        rstd = torch.empty_like(mean) if save else None
        names = self._names(word.dtype, weight.dtype, out_dtype)
        cuda.launch(SOURCE, names[0], rows, row_block(hidden),
                    [cuda.pointer(t) for t in (ids, types, word, position, token_type, weight,
                                                bias, out, mean, rstd)]
                    + [np.int64(seq), np.int64(hidden), np.float32(eps), np.float32(p),
                       np.uint64(seed)],
                    device=ids.device, name_expressions=names)
        return out, (mean, rstd)

    def backward(self, grad, ids, types, seq, word, position, token_type, weight, mean, rstd,
                 *, p, seed, bias_dtype):
        rows, hidden = grad.shape
        blocks = min(rows, BACKWARD_BLOCKS)
        tables = (word, position.to(word.dtype), token_type.to(word.dtype))
        dsum = torch.empty((rows, hidden), dtype=torch.float32, device=grad.device)
        parts = torch.empty((2, blocks, hidden), dtype=torch.float32, device=grad.device)
        names = self._names(word.dtype, weight.dtype, grad.dtype)
        cuda.launch(SOURCE, names[1], blocks, row_block(hidden),
                    [cuda.pointer(t) for t in (grad, ids, types, *tables, weight, mean, rstd,
                                                dsum, parts[0], parts[1])]
                    + [np.int64(rows), np.int64(seq), np.int64(hidden), np.float32(p),
                       np.uint64(seed)],
                    device=grad.device, name_expressions=names)
        sums = parts.sum(1)  # (2, H), a fixed order
        return (*table_grads(dsum, ids, types, seq, word, position, token_type),
                sums[0].to(weight.dtype), sums[1].to(bias_dtype))


TORCH = TorchEmbedLayerNorm()
CUDA = CudaEmbedLayerNorm()


class EmbedLayerNormFunction(torch.autograd.Function):
    """dropout(LayerNorm(word[ids] + position[0..S-1] + token_type[types])) for (B, S) ids by
    `impl`'s explicit forward and backward; `types` None means type 0 everywhere, `p` is the
    dropout probability (0: none), `seed` its Philox key, `out_dtype` the output's dtype."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, types: torch.Tensor | None, word: torch.Tensor,
                position: torch.Tensor, token_type: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, eps: float, p: float, seed: int, out_dtype: torch.dtype,
                impl: Any) -> torch.Tensor:
        (batch, seq), hidden = ids.shape, word.shape[1]
        flat_types = None if types is None else types.reshape(-1)
        save = any(ctx.needs_input_grad[2:7])
        # (B, S) -> (B*S,) tokens -> (B*S, H)
        out, (mean, rstd) = impl.forward(ids.reshape(-1), flat_types, seq, word, position,
                                         token_type, weight, bias, eps=eps, p=p, seed=seed,
                                         out_dtype=out_dtype, save=save)
        if save:
            ctx.save_for_backward(ids, flat_types, word, position, token_type, weight, mean,
                                  rstd)
            ctx.meta = (p, seed, bias.dtype, out_dtype, impl)
        return out.view(batch, seq, hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ids, types, word, position, token_type, weight, mean, rstd = ctx.saved_tensors
        p, seed, bias_dtype, out_dtype, impl = ctx.meta
        batch, seq = ids.shape
        grad = grad.to(out_dtype).reshape(batch * seq, -1).contiguous()
        grads = impl.backward(grad, ids.reshape(-1), types, seq, word, position, token_type,
                              weight, mean, rstd, p=p, seed=seed, bias_dtype=bias_dtype)
        return (None, None, *grads, None, None, None, None, None)
