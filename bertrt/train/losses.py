"""The training losses of each task, written so that data parallelism does not change them.

Every loss is a *sum* over this process's items divided by a denominator the caller passes: the
number of items in the whole optimizer step, over every micro-batch and every rank, divided by
the world size (DDP averages gradients over ranks, which the division undoes). So N ranks at
batch b give the same loss and gradients as 1 rank at batch N·b, however the masked tokens fall
between ranks and micro-batches.

Each function returns the loss to back-propagate and a vector of detached sums for logging
(named by the matching `*_STATS` tuple); summed over micro-batches and ranks, the sums give
the step's exact metrics.

The MLM loss is `bertrt.kernels.mlm_loss`: on CUDA a fused kernel whose backward writes the
gradient over the prediction logits (nothing may use them after the loss), elsewhere torch's
cross-entropy, as it always was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bertrt.kernels import mlm_loss
from bertrt.train.data import IGNORE_INDEX as IGNORE

PRETRAINING_STATS = ("mlm_loss_sum", "mlm_correct", "mlm_count",
                     "nsp_loss_sum", "nsp_correct", "nsp_count")
CLASSIFICATION_STATS = ("loss_sum", "correct", "count")  # tagging uses these too


def pretraining_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(masked tokens, sentence pairs) of one micro-batch: the loss denominators' parts."""
    mlm = (batch["mlm_labels"] != IGNORE).sum()
    nsp = (batch["nsp_labels"] != IGNORE).sum()
    return torch.stack([mlm, nsp]).double()


def pretraining_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                     denominators: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM on the masked rows + NSP, each a sum over this micro-batch / its step denominator.

    Args:
        outputs: the forward's dict; `prediction_logits` (M, V) are the rows of
            `batch["masked_positions"]` (on CUDA, consumed by the backward: see the module
            doc), `seq_relationship_logits` (B, 2).
        batch: `mlm_labels` (M,), `nsp_labels` (B,).
        denominators: (2,) masked-token and sentence-pair counts of the step (see module doc).
    """
    mlm_logits = outputs["prediction_logits"]  # (M, V)
    nsp_logits = outputs["seq_relationship_logits"].float()  # (B, 2)
    # the collated labels stay on the host; the logits' device (a no-op on CPU)
    mlm_labels = batch["mlm_labels"].to(mlm_logits.device)
    nsp_labels = batch["nsp_labels"].to(nsp_logits.device)
    mlm_sum, mlm_correct, mlm_count = mlm_loss(mlm_logits, mlm_labels)
    nsp_sum = F.cross_entropy(nsp_logits, nsp_labels, ignore_index=IGNORE, reduction="sum")
    loss = mlm_sum / denominators[0].clamp(min=1) + nsp_sum / denominators[1].clamp(min=1)
    with torch.no_grad():
        nsp_keep = nsp_labels != IGNORE
        stats = torch.stack([
            mlm_sum.double(),
            mlm_correct.double(),
            mlm_count.double(),
            nsp_sum.double(),
            ((nsp_logits.argmax(-1) == nsp_labels) & nsp_keep).sum().double(),
            nsp_keep.sum().double(),
        ])
    return loss, stats


def label_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(labelled items,) of one micro-batch: sequences (classify) or first sub-tokens (tag)."""
    return (batch["labels"] != IGNORE).sum().double().reshape(1)


def classification_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                        denominators: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `logits` (B, C) against `labels` (B,), or of token logits (B, S, C)
    against `labels` (B, S) with -100 on ignored positions (tagging)."""
    logits = outputs["logits"].float()
    labels = batch["labels"].to(logits.device)  # from the host; a no-op on CPU
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    loss = loss_sum / denominators[0].clamp(min=1)
    with torch.no_grad():
        keep = labels != IGNORE
        stats = torch.stack([loss_sum.double(),
                             ((logits.argmax(-1) == labels) & keep).sum().double(),
                             keep.sum().double()])
    return loss, stats



#: Sums a regression step is summarized from: the squared error, the count, and the moments
#: that give the Pearson correlation of predictions and scores exactly over ranks.
REGRESSION_STATS = ("loss_sum", "count", "pred_sum", "gold_sum", "pred_sq_sum", "gold_sq_sum",
                    "cross_sum")


def score_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(scored examples,) of one micro-batch (every example has a score)."""
    return torch.tensor([float(batch["labels"].numel())], dtype=torch.float64)


def regression_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                    denominators: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error of the single logit (B, 1) against the float `labels` (B,)."""
    preds = outputs["logits"].float().reshape(-1)  # (B, 1) -> (B,)
    golds = batch["labels"].to(preds.device, torch.float32)
    loss_sum = ((preds - golds) ** 2).sum()
    loss = loss_sum / denominators[0].clamp(min=1)
    with torch.no_grad():
        p, g = preds.double(), golds.double()
        stats = torch.stack([loss_sum.double(), torch.full((), float(len(g)), dtype=torch.float64,
                                                           device=p.device),
                             p.sum(), g.sum(), (p * p).sum(), (g * g).sum(), (p * g).sum()])
    return loss, stats
