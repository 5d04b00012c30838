"""Pure-torch MLM loss: torch's cross-entropy and argmax, exactly what training ran before the
fused kernel (CPU training keeps these very operations, so its results do not change)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The label of a row that takes no loss (torch's `ignore_index` default, bertrt's data too).
IGNORE_INDEX = -100


def mlm_loss(logits: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct, count) of logits (M, V) against labels (M,).

    The loss is computed in float32 (or float64 for float64 logits) and differentiable; `correct`
    counts the non-ignored rows whose argmax is the label, `count` the non-ignored rows (both
    int64, detached). The logits are left as they are.
    """
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX,
                               reduction="sum")
    with torch.no_grad():
        keep = labels != IGNORE_INDEX
        correct = ((logits.argmax(-1) == labels) & keep).sum()
        count = keep.sum()
    return loss_sum, correct, count
