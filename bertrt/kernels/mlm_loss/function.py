"""The MLM loss as an autograd Function over two implementations of the same formulas.

Per row r with label y (rows labelled `IGNORE_INDEX` take no part):

    lse_r  = max_j x_rj + log sum_j exp(x_rj - max_j x_rj)
    loss_r = lse_r - x_ry
    hit_r  = (first argmax_j x_rj) == y
    d loss_r / d x_rj = exp(x_rj - lse_r) - [j == y]

`forward` returns the per-row losses and hits and keeps `lse` (rows,) for the backward, which
writes the gradient times the upstream gradient of each row over the logits: the logits'
buffer is *consumed* by the backward (no (rows, vocab) tensor is allocated, none is stored).

`CupyMlmLoss` runs `mlm_loss.cu`; `TorchMlmLoss` is the same arithmetic in torch, on any device
and dtype (float64 on CPU is what the tests check it with, against torch's cross-entropy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from bertrt.kernels import cuda
from bertrt.kernels.mlm_loss.reference import IGNORE_INDEX

SOURCE = Path(__file__).with_name("mlm_loss.cu")
#: At most this many blocks per launch; beyond it each block strides over several rows.
MAX_BLOCKS = 1 << 16


class MlmLossImplementation(Protocol):
    """The two halves of the op; `MlmLossFunction` calls them."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss (M,) fp32, lse (M,) fp32, hit (M,) bool); the logits are only read."""

    def backward(self, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                 grad_rows: torch.Tensor) -> torch.Tensor:
        """`logits` overwritten by (softmax - onehot) * grad_rows[:, None]; returns them."""


class TorchMlmLoss:
    """The formulas in torch (any device; float64 keeps float64). Its temporaries are
    (M, V): it is the readable statement of the math, not a memory-lean path."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = logits if logits.dtype == torch.float64 else logits.float()
        keep = labels != IGNORE_INDEX
        safe = torch.where(keep, labels, 0)
        row_max = x.max(-1).values
        lse = row_max + (x - row_max[:, None]).exp().sum(-1).log()
        loss = torch.where(keep, lse - x.gather(1, safe[:, None])[:, 0], 0.0)
        hit = keep & (x.argmax(-1) == labels)
        return loss, lse, hit

    def backward(self, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                 grad_rows: torch.Tensor) -> torch.Tensor:
        x = logits if logits.dtype == torch.float64 else logits.float()
        keep = labels != IGNORE_INDEX
        grad = (x - lse[:, None]).exp()
        rows = torch.arange(len(labels), device=labels.device)[keep]
        grad[rows, labels[keep]] -= 1.0
        grad *= torch.where(keep, grad_rows.to(grad.dtype), 0.0)[:, None]
        return logits.copy_(grad)


class CupyMlmLoss:
    """`mlm_loss.cu` on the logits' device, on torch's current stream."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, vocab = logits.shape
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        hit = torch.empty(rows, dtype=torch.bool, device=logits.device)
        if rows:
            self._launch("mlm_loss_forward", logits, (
                cuda.pointer(logits), cuda.pointer(labels), cuda.pointer(loss),
                cuda.pointer(lse), cuda.pointer(hit), np.int64(rows), np.int64(vocab)))
        return loss, lse, hit

    def backward(self, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                 grad_rows: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        grad_rows = grad_rows.float()  # autograd's is often an expanded scalar: stride 0
        if rows:
            self._launch("mlm_loss_backward", logits, (
                cuda.pointer(logits), cuda.pointer(labels), cuda.pointer(lse),
                cuda.pointer(grad_rows), np.int64(grad_rows.stride(0)), np.int64(rows),
                np.int64(vocab)))
        torch.autograd.graph.increment_version(logits)  # written through a raw pointer
        return logits

    @staticmethod
    def _launch(kernel: str, logits: torch.Tensor, args: tuple[Any, ...]) -> None:
        rows, vocab = logits.shape
        # at least 16 elements a thread, 32 to 512 threads: a warp for a tiny vocabulary
        threads = 32 * min(max(-(-vocab // (32 * 16)), 1), 16)
        names = tuple(f"{k}<{ct}>" for k in ("mlm_loss_forward", "mlm_loss_backward")
                      for ct in cuda.CTYPES.values())
        cuda.launch(SOURCE, f"{kernel}<{cuda.ctype(logits.dtype)}>", min(rows, MAX_BLOCKS),
                    threads, args, device=logits.device, name_expressions=names)


CUPY = CupyMlmLoss()
TORCH = TorchMlmLoss()


class MlmLossFunction(torch.autograd.Function):
    """(loss (M,), hit (M,)) of logits (M, V) and labels (M,); the backward consumes the
    logits' buffer (see the module docstring). Its backward runs once: a second one (a graph
    kept with `retain_graph=True`) would read a gradient where the logits were, and raises."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor,
                impl: MlmLossImplementation) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.is_leaf and logits.requires_grad:
            raise ValueError("mlm_loss: its backward writes the gradient over the logits, and "
                             "these are a leaf that requires a gradient (the caller's own "
                             "buffer); pass a computed tensor")
        loss, lse, hit = impl.forward(logits, labels)
        # Saved as they are: the version counter then catches any in-place change to the
        # logits between this forward and the backward that consumes them.
        ctx.save_for_backward(logits, labels, lse)
        ctx.impl, ctx.consumed = impl, False
        ctx.mark_non_differentiable(hit)
        return loss, hit

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_hit: Any
                 ) -> tuple[torch.Tensor, None, None]:
        if ctx.consumed:
            raise RuntimeError("mlm_loss: its backward writes the gradient over the logits and "
                               "can run only once (the graph was kept with retain_graph=True)")
        logits, labels, lse = ctx.saved_tensors
        ctx.consumed = True
        return ctx.impl.backward(logits, labels, lse, grad_loss), None, None
