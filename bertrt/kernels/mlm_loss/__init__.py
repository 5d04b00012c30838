"""The MLM loss: softmax cross-entropy of the masked rows over the vocabulary, with accuracy.

`mlm_loss(logits, labels) -> (loss_sum, correct, count)` for logits (M, V) (float32, bfloat16 or
float16; M masked rows, V the vocabulary: 30,522 for BERT, any V) and labels (M,) int64 with
`IGNORE_INDEX` (-100) on rows that take no loss. `loss_sum` is the fp32 sum of the rows'
cross-entropy (differentiable), `correct` the rows whose argmax (first maximal index, as
`torch.argmax`) is the label, `count` the labelled rows (int64, detached). The training losses
divide `loss_sum` by a step-wide denominator (`bertrt.train.losses`).

**CUDA (kernel).** One block per row (`mlm_loss.cu`):

* forward: one read of the row with an online max and sum of exp (each thread over its strided
  elements, combined over the block), giving the row's log-sum-exp `lse`, its loss
  `lse - x[label]` and, in the same pass, the first index of its maximum. Kept for the backward:
  `lse` (M,) fp32 only. No probabilities are stored.
* backward: a second read, and `(exp(x - lse) - onehot) * g_r` written **in place over the
  logits**, with `g_r` the upstream gradient of row r's loss (autograd's: for
  `loss_sum / denominator` under a GradScaler, scale / denominator for every row). The scale is
  applied before rounding to the logits' dtype, once: with fp16 logits the GradScaler's scale
  keeps the small probabilities from flushing to zero, as with torch's own cross-entropy.
  Rows labelled -100 get a zero gradient; a label outside [0, V) a NaN loss (a kernel cannot
  raise; the training loop's finite check reports it).
  Bytes moved: two reads and one write of (M, V), nothing of that size allocated.

**The in-place contract.** The logits tensor is *consumed by the backward*: once the backward
has run, its buffer holds the gradient. That is sound when nothing else needs the logits'
values after the loss, which holds in training: the decoder's matmul backward needs its inputs,
not its output, and the accuracy the training loss used argmax for comes from this op. Guards:

* the Function saves the logits for its backward, so autograd's version counter raises if
  anything changes them between the forward and the backward;
* the backward bumps their version counter, so any other node that saved the logits and
  unpacks them later raises instead of reading a gradient;
* the backward runs once (a second one through a graph kept by `retain_graph=True` raises);
* a leaf that requires a gradient is refused: its buffer is the user's.

Without a backward (evaluation, `torch.no_grad()`) the logits are left untouched.

**Elsewhere (CPU, no CuPy, `BERTRT_KERNELS=reference`).** `reference.mlm_loss`: torch's
cross-entropy on the fp32 logits and `argmax`, the exact operations training ran before this
op, so CPU results are bitwise what they were. `function.TorchMlmLoss` is the kernel's arithmetic
written in torch; plugged into the same Function, the CPU tests check it against torch's
cross-entropy in float64 (forward, backward, the version-counter guards, and a real backward of
the pretraining head).
"""

from __future__ import annotations

import torch

from bertrt.kernels import cuda
from bertrt.kernels.mlm_loss.function import CUPY, MlmLossFunction, MlmLossImplementation
from bertrt.kernels.mlm_loss.reference import IGNORE_INDEX
from bertrt.kernels.mlm_loss.reference import mlm_loss as mlm_loss_reference

__all__ = ["IGNORE_INDEX", "fused_mlm_loss", "mlm_loss"]


def mlm_loss(logits: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct, count) of logits (M, V) against labels (M,).

    On CUDA with CuPy the fused kernel runs and **the backward consumes the logits** (writes
    their gradient into their buffer; see the module docstring). Elsewhere torch's
    cross-entropy runs and the logits are kept.

    Args:
        logits: (M, V) float32, bfloat16 or float16, contiguous on CUDA.
        labels: (M,) int64 class indices, `IGNORE_INDEX` (-100) on rows without a loss.

    Returns:
        `loss_sum` (fp32, differentiable), `correct` and `count` (int64, detached).
    """
    if not cuda.wants_kernel(logits, labels):
        return mlm_loss_reference(logits, labels)
    _check(logits, labels)
    return fused_mlm_loss(logits, labels, CUPY)


def fused_mlm_loss(logits: torch.Tensor, labels: torch.Tensor, impl: MlmLossImplementation
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mlm_loss` through `MlmLossFunction` with `impl` (the CPU tests plug in the torch
    implementation, `function.TORCH`); the backward consumes the logits."""
    loss, hit = MlmLossFunction.apply(logits, labels, impl)
    with torch.no_grad():
        count = (labels != IGNORE_INDEX).sum()
    return loss.sum(), hit.sum(), count


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """One-line errors for inputs the kernel does not take."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"mlm_loss: logits (M, V) and labels (M,), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"mlm_loss: labels must be int64, not {labels.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("mlm_loss: the vocabulary is empty (V = 0)")
    if logits.device != labels.device:
        raise ValueError(f"mlm_loss: logits on {logits.device}, labels on {labels.device}")
    cuda.ctype(logits.dtype)
    cuda.require_contiguous(logits=logits, labels=labels)
