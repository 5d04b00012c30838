"""Multi-tensor AdamW and LAMB in torch: the kernels' arithmetic, one tensor at a time.

Any device and float dtype; the arithmetic runs in the state's dtype (float32, or float64 for
float64 parameters, which is how the tests check it). On CUDA this path reads the step counts
and `found_inf` on the host; the kernels (`optim.cu`) never do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def skipped(found_inf: torch.Tensor | None) -> bool:
    """A GradScaler found inf or NaN gradients: the step changes nothing, its count included."""
    return found_inf is not None and float(found_inf) != 0.0


def adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
               steps: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float],
               eps: float, weight_decay: float, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None) -> None:
    """torch.optim.AdamW's step on each tensor; see `bertrt.kernels.optim.adamw_step`."""
    if skipped(found_inf):
        return
    beta1, beta2 = betas
    for w, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        grad = _unscaled(g, m.dtype, grad_scale)
        x = w.to(m.dtype)  # w itself when the dtypes agree
        t = float(step) + 1.0
        x.sub_(x * (lr * weight_decay))
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        x.sub_((lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps))
        if x is not w:
            w.copy_(x)
        step.add_(1)


def lamb_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
              steps: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float],
              eps: float, weight_decay: float, adapt: bool,
              grad_scale: torch.Tensor | None = None,
              found_inf: torch.Tensor | None = None) -> None:
    """`bertrt.train.optim.Lamb`'s step on each tensor; see `bertrt.kernels.optim.lamb_step`."""
    if skipped(found_inf):
        return
    beta1, beta2 = betas
    for w, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        grad = _unscaled(g, m.dtype, grad_scale)
        x = w.to(m.dtype)
        t = float(step) + 1.0
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        update = (m / (1.0 - beta1**t)) / ((v / (1.0 - beta2**t)).sqrt() + eps)
        update += weight_decay * x
        ratio = torch.ones((), dtype=x.dtype, device=x.device)
        if adapt:
            w_norm, u_norm = x.norm(), update.norm()
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, ratio)
        x.sub_(lr * (update * ratio))
        if x is not w:
            w.copy_(x)
        step.add_(1)


def _unscaled(grad: torch.Tensor, dtype: torch.dtype,
              grad_scale: torch.Tensor | None) -> torch.Tensor:
    """The gradient in `dtype`, divided by the GradScaler's scale when there is one."""
    grad = grad.to(dtype)
    return grad if grad_scale is None else grad / grad_scale.to(grad.device, dtype)
