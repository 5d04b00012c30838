"""Multi-tensor AdamW and LAMB: every parameter of a group stepped in a few launches.

`adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay,
grad_scale=None, found_inf=None)` and `lamb_step(..., adapt)` update one parameter group in
place: parameters (fp32 master weights, or bf16/fp16 parameters with gradients of their dtype),
fp32 `exp_avg`/`exp_avg_sq`, and `steps`, one 0-d fp32 tensor per parameter on its device
(as torch's fused Adam keeps them), advanced by one. The optimizers that call them are
`bertrt.train.optim.FusedAdamW` and `FusedLamb`.

**The math.** AdamW is torch.optim.AdamW's (decoupled weight decay, bias correction):

    w -= lr wd w;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

LAMB is `bertrt.train.optim.Lamb`'s: u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd w
and w -= lr r u, with the trust ratio r = ||w|| / ||u|| per tensor (1 when either norm is 0, and
for groups with `adapt=False`: biases and LayerNorm). Per-group learning rates, weight decays
and `adapt` flags are arguments: the optimizers call once per group, as `param_groups` builds
them (decay / no-decay, and a pair per `lr_scale` with --layer-lr-decay).

**CUDA (kernels, `optim.cu`).** Each launch reads device tables: an int64 (6, n) table of the
n tensors' parameter, gradient, exp_avg, exp_avg_sq and step addresses and sizes, and a chunk
table; each block updates one 16,384-element chunk of one tensor. The tables go to the device in
one asynchronous copy from pinned memory per group and step. AdamW is one launch (per parameter
dtype in the group). LAMB is three: phase 1 updates the moments and writes each chunk's sums of
w^2 and u^2 into a buffer; one block per tensor adds its chunks' sums in a fixed order
(deterministic) into its trust ratio; phase 2 recomputes u from the new moments (no buffer of
updates) and applies lr r u. A last launch advances the step counts. Arithmetic in fp32; the
bias corrections as -expm1(t log b) with log b from the host in double.

**Mixed precision.** The optimizers set `_step_supports_amp_scaling`, so a
`torch.amp.GradScaler` hands them its `grad_scale` (or None when `unscale_` already ran) and
`found_inf` as device tensors instead of checking for infs on the host. The kernels divide
the gradients by `grad_scale` and, when `found_inf` is non-zero, return before writing:
parameters, moments and step counts stay as they were, and the host never waits.

**Elsewhere (CPU, no CuPy, `BERTRT_KERNELS=reference`).** `reference.py`: the same formulas in
torch, one tensor at a time, in the state's dtype (float64 for the tests, which compare it with
torch.optim.AdamW and a LAMB written out in float64). CPU training does not use it: it keeps
torch's AdamW and `Lamb`, so its results are bitwise what they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bertrt.kernels import cuda
from bertrt.kernels.optim import reference
from bertrt.kernels.optim.kernel import CUPY

__all__ = ["adamw_step", "lamb_step"]


def adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
               steps: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float],
               eps: float, weight_decay: float, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None) -> None:
    """One AdamW step of one parameter group, in place (see the module docstring).

    Args:
        params, grads, exp_avgs, exp_avg_sqs, steps: per tensor, in the same order.
        lr, betas, eps, weight_decay: the group's hyperparameters.
        grad_scale: a GradScaler's scale that the gradients still carry, or None.
        found_inf: non-zero when a GradScaler found inf/NaN gradients: nothing changes.
    """
    if cuda.wants_kernel(*params):
        CUPY.adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, betas=betas,
                        eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
                        found_inf=found_inf)
    else:
        reference.adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, betas=betas,
                             eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
                             found_inf=found_inf)


def lamb_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
              steps: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float],
              eps: float, weight_decay: float, adapt: bool,
              grad_scale: torch.Tensor | None = None,
              found_inf: torch.Tensor | None = None) -> None:
    """One LAMB step of one parameter group, in place; `adapt=False` skips the trust ratio.
    Arguments as `adamw_step`'s."""
    if cuda.wants_kernel(*params):
        CUPY.lamb_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, betas=betas,
                       eps=eps, weight_decay=weight_decay, adapt=adapt, grad_scale=grad_scale,
                       found_inf=found_inf)
    else:
        reference.lamb_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, betas=betas,
                            eps=eps, weight_decay=weight_decay, adapt=adapt,
                            grad_scale=grad_scale, found_inf=found_inf)
