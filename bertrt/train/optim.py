"""Optimizers and learning-rate schedules as the BERT recipe uses them.

AdamW (torch's) or LAMB, both with decoupled weight decay that skips biases and LayerNorm
parameters (which ones, the IR says: `no_decay_names`); a linear warm-up followed by a linear or
polynomial decay to zero. Everything here keeps its state in `state_dict()`s of plain numbers
and tensors, so a checkpoint of it loads with `torch.load(weights_only=True)`.

On CUDA (with CuPy) `build_optimizer` returns `FusedAdamW` or `FusedLamb`: the same math and the
same `state_dict()`s, stepped by bertrt's multi-tensor kernels (`bertrt.kernels.optim`), a few
launches for all parameters, GradScaler's inf check on the device. Elsewhere it returns torch's
AdamW and `Lamb`, so CPU training is what it always was.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bertrt.errors import BertrtError
from bertrt.graph import Graph, Op
from bertrt.kernels import cuda
from bertrt.kernels.optim import adamw_step, lamb_step

#: Adam's epsilon in the BERT recipe.
ADAM_EPS = 1e-6
BETAS = (0.9, 0.999)
#: The decay exponent of `--schedule poly`.
POLY_POWER = 2.0


#: Per op, the inputs that take no weight decay: LayerNorm's weight and bias, a linear's bias.
NO_DECAY_INPUTS = {Op.LAYER_NORM: (1, 2), Op.LINEAR: (2,)}


def no_decay_names(graph: Graph) -> frozenset[str]:
    """The parameters that take no weight decay, read from the IR: those that some node takes
    at a `NO_DECAY_INPUTS` position (every LayerNorm's weight and bias, every linear bias, the
    MLM decoder's included). `graph` is a model's graph as built (`Model.graph`)."""
    return frozenset(name for name, value in graph.params.items()
                     if any(index in NO_DECAY_INPUTS.get(node.op, ())
                            for node, index in value.users))


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 weight_decay: float, no_decay: Collection[str],
                 lr_scales: Mapping[str, float] | None = None) -> list[dict]:
    """Two groups: parameters with weight decay, and those named in `no_decay` (biases and
    LayerNorm: `no_decay_names`). With `lr_scales` (name -> learning-rate factor:
    `stages.lr_scales`), two such groups per factor, the largest factor first, each with its
    `lr_scale`.

    Every parameter is in a group, frozen ones too (`requires_grad=False`: the optimizers step
    only parameters with a gradient, so they hold no state for them)."""
    groups: dict[float, tuple[list, list]] = {}
    for name, param in named_params:
        scale = 1.0 if lr_scales is None else lr_scales[name]
        decayed, kept = groups.setdefault(scale, ([], []))
        (kept if name in no_decay else decayed).append(param)
    out = []
    for scale in sorted(groups, reverse=True):
        decayed, kept = groups[scale]
        out += [{"params": decayed, "weight_decay": weight_decay, "adapt": True},
                {"params": kept, "weight_decay": 0.0, "adapt": False}]
        if lr_scales is not None:
            out[-2]["lr_scale"] = out[-1]["lr_scale"] = scale
    return [g for g in out if g["params"]] if lr_scales is not None else out


class Lamb(Optimizer):
    """LAMB (You et al., 2019): Adam's update rescaled per tensor by the trust ratio
    ||w|| / ||update||, so every layer moves by a similar fraction of its norm.

    The update is Adam's bias-corrected m / (sqrt(v) + eps) plus decoupled weight decay; groups
    with `adapt=False` (biases, LayerNorm) skip the trust ratio, as in the BERT LAMB recipe.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = BETAS,
                 eps: float = ADAM_EPS, weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                ratio = 1.0
                if group["adapt"]:
                    w_norm, u_norm = p.float().norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.add_((update * ratio).to(p.dtype), alpha=-group["lr"])
        return loss


class FusedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW stepped by bertrt's multi-tensor kernels (`bertrt.kernels.optim`).

    The same hyperparameters, param-group keys and `state_dict()` as torch's fused AdamW (a
    0-d fp32 step on each parameter's device, `fused=True`), so a checkpoint resumes with
    either; the moments are fp32 whatever the parameters' dtype. On CPU, or without CuPy, the
    step runs the kernels' arithmetic in torch. A GradScaler hands it `grad_scale` and
    `found_inf` (`_step_supports_amp_scaling`): a step with inf gradients changes nothing, with
    no host synchronisation. amsgrad and maximize are not implemented.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:  # torch's defaults
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         fused=True)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a checkpoint of another AdamW names its own path
            group.update(fused=True, foreach=None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise BertrtError("FusedAdamW: amsgrad and maximize are not implemented")
            tensors = _with_state(self, group)
            if tensors[0]:
                adamw_step(*tensors, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                           weight_decay=group["weight_decay"], **_scaler_tensors(self))
        return loss


class FusedLamb(Lamb):
    """`Lamb` stepped by bertrt's multi-tensor kernels (`bertrt.kernels.optim`).

    The same hyperparameters and `state_dict()` as `Lamb` (steps as ints), so a checkpoint
    resumes with either; while it runs, each step count is a 0-d fp32 tensor on its
    parameter's device, so a GradScaler's skipped step (`_step_supports_amp_scaling`, as
    `FusedAdamW`) leaves it as it was without the host looking. On CPU, or without CuPy, the
    step runs the kernels' arithmetic in torch.
    """

    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            tensors = _with_state(self, group)
            if tensors[0]:
                lamb_step(*tensors, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                          weight_decay=group["weight_decay"], adapt=group["adapt"],
                          **_scaler_tensors(self))
        return loss

    def state_dict(self) -> dict:
        """`Lamb`'s: each step an int (read from the device: one sync per parameter)."""
        state = super().state_dict()
        state["state"] = {key: {**entry, "step": int(entry["step"])}
                          for key, entry in state["state"].items()}
        return state


def _closure_loss(closure: Callable[[], float] | None) -> float | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _scaler_tensors(optimizer: Optimizer) -> dict[str, torch.Tensor | None]:
    """What a GradScaler sets on an optimizer with `_step_supports_amp_scaling` for its step."""
    return {"grad_scale": getattr(optimizer, "grad_scale", None),
            "found_inf": getattr(optimizer, "found_inf", None)}


def _with_state(optimizer: Optimizer, group: dict) -> tuple[list[torch.Tensor], ...]:
    """(params, grads, exp_avgs, exp_avg_sqs, steps) of the group's parameters that have a
    gradient; their state created, or brought to what the kernels keep (loaded from another
    optimizer's checkpoint): moments in fp32 (float64 for float64 parameters), each step a 0-d
    fp32 tensor on the parameter's device."""
    roles: tuple[list[torch.Tensor], ...] = ([], [], [], [], [])
    for p in group["params"]:
        if p.grad is None:
            continue
        state = optimizer.state[p]
        dtype = torch.promote_types(p.dtype, torch.float32)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        step = state["step"]
        if not (torch.is_tensor(step) and step.dtype == torch.float32
                and step.device == p.device):
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key].to(dtype)
        for role, tensor in zip(roles, (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                        state["step"])):
            role.append(tensor)
    return roles


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], name: str,
                    lr: float, weight_decay: float, no_decay: Collection[str],
                    lr_scales: Mapping[str, float] | None = None) -> Optimizer:
    """AdamW or LAMB over `named_params`, no decay on those named in `no_decay` (biases and
    LayerNorm weights: `no_decay_names(model.graph)`); with `lr_scales`, each parameter's peak
    learning rate is `lr` times its factor (`--layer-lr-decay`).

    Parameters on CUDA with CuPy get `FusedAdamW` / `FusedLamb` (bertrt's kernels); others
    torch's AdamW / `Lamb`. Checkpoints move between the two."""
    groups = param_groups(named_params, weight_decay, no_decay, lr_scales)
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    params = [p for g in groups for p in g["params"]]
    ours = cuda.wants_kernel(*params)
    if name == "adamw":
        for group in groups:
            group.pop("adapt")
        if ours:
            return FusedAdamW(groups, lr=lr, betas=BETAS, eps=ADAM_EPS)
        # The fused implementation (CPU and CUDA) is one kernel per step instead of a dozen
        # element-wise passes: about 5x faster on the optimizer's share of a CPU step.
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=ADAM_EPS, fused=fused)
    if name == "lamb":
        return (FusedLamb if ours else Lamb)(groups, lr=lr, betas=BETAS, eps=ADAM_EPS)
    raise BertrtError(f"--optimizer {name!r} is unknown; expected adamw or lamb")


class WarmupDecay:
    """The learning-rate factor of optimizer step `s` (0-based): (s+1)/W during the W warm-up
    steps, then ((T - s) / (T - W)) ** power down to the last step T-1 (never exactly zero)."""

    def __init__(self, warmup_steps: int, total_steps: int, power: float = 1.0) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.power = float(power)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        left = max(self.total_steps - step, 0) / max(self.total_steps - self.warmup_steps, 1)
        return left**self.power


def build_scheduler(optimizer: Optimizer, schedule: str, warmup: float,
                    max_steps: int) -> LambdaLR:
    """Warm-up over `warmup` x `max_steps` steps, then linear or polynomial decay to zero."""
    if schedule not in ("linear", "poly"):
        raise BertrtError(f"--schedule {schedule!r} is unknown; expected linear or poly")
    power = 1.0 if schedule == "linear" else POLY_POWER
    return LambdaLR(optimizer, WarmupDecay(round(warmup * max_steps), max_steps, power))
