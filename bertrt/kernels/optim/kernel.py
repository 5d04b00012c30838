"""Multi-tensor AdamW and LAMB on CUDA: `optim.cu` over device tables of addresses.

A step of a group: one host-to-device copy of its tables (addresses and sizes, from pinned
memory, asynchronous), then per parameter dtype one launch (AdamW) or three (LAMB: moments
with per-chunk norm sums, per-tensor trust ratios, apply; two without the trust ratio), and
one that advances the step counts. Nothing waits for the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bertrt.kernels import cuda

SOURCE = Path(__file__).with_name("optim.cu")
#: Elements a block updates: one chunk of one tensor (BERT-base: about 7,000 blocks).
CHUNK = 16384
THREADS = 256
NAMES = (*(f"{kernel}<{ct}>" for kernel in ("adamw_step", "lamb_moments", "lamb_apply")
           for ct in cuda.CTYPES.values()), "lamb_trust_ratios", "advance_steps")


#: The tensors table's rows, in the order of optim.cu's `enum Role`.
ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "step", "numel")


def host_tables(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                steps: Sequence[torch.Tensor]) -> tuple[np.ndarray, int, int]:
    """(tables, n, c): the int64 tables of one launch, concatenated: `tensors` (6n: the
    `ROLES`' rows), `chunks` (2c: each chunk's tensor, then its first element) and
    `first_chunk` (n + 1: where each tensor's chunks begin, and their total)."""
    n = len(params)
    numels = np.array([p.numel() for p in params], dtype=np.int64)
    counts = -(-numels // CHUNK)
    first = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    n_chunks = int(first[-1])
    owner = np.repeat(np.arange(n, dtype=np.int64), counts)
    start = (np.arange(n_chunks, dtype=np.int64) - first[owner]) * CHUNK
    addresses = [np.array([t.data_ptr() for t in role], dtype=np.int64)
                 for role in (params, grads, exp_avgs, exp_avg_sqs, steps)]
    return np.concatenate([*addresses, numels, owner, start, first]), n, n_chunks


@dataclass(frozen=True)
class Tables:
    """The device tables of one launch (`host_tables`), views of one int64 buffer."""

    n: int
    n_chunks: int
    tensors: torch.Tensor
    chunks: torch.Tensor
    first_chunk: torch.Tensor

    @classmethod
    def build(cls, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
              steps: Sequence[torch.Tensor]) -> Tables:
        host, n, n_chunks = host_tables(params, grads, exp_avgs, exp_avg_sqs, steps)
        # pinned, so the copy is asynchronous; torch keeps the pinned block until it is done
        table = torch.from_numpy(host).pin_memory().to(params[0].device, non_blocking=True)
        return cls(n, n_chunks, table[:6 * n], table[6 * n:6 * n + 2 * n_chunks],
                   table[6 * n + 2 * n_chunks:])


class CupyMultiTensor:
    """The multi-tensor steps on CUDA tensors (all on one device; checked by `_partitions`)."""

    def adamw_step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                   steps: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float],
                   eps: float, weight_decay: float, grad_scale: torch.Tensor | None = None,
                   found_inf: torch.Tensor | None = None) -> None:
        for dtype, tensors in _partitions(params, grads, exp_avgs, exp_avg_sqs, steps):
            device = tensors[0][0].device
            scale, inf = _scalar(grad_scale, device), _scalar(found_inf, device)
            tables = Tables.build(*tensors)
            if tables.n_chunks:
                _launch(f"adamw_step<{cuda.ctype(dtype)}>", tables.n_chunks, device, (
                    *_layout(tables), np.float32(lr), *_betas(betas), np.float32(eps),
                    np.float32(weight_decay), cuda.pointer(scale), cuda.pointer(inf)))
            _advance(tables, inf, device)

    def lamb_step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                  steps: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float],
                  eps: float, weight_decay: float, adapt: bool,
                  grad_scale: torch.Tensor | None = None,
                  found_inf: torch.Tensor | None = None) -> None:
        for dtype, tensors in _partitions(params, grads, exp_avgs, exp_avg_sqs, steps):
            device = tensors[0][0].device
            scale, inf = _scalar(grad_scale, device), _scalar(found_inf, device)
            tables = Tables.build(*tensors)
            ct = cuda.ctype(dtype)
            b1, b2, one_b1, one_b2, log_b1, log_b2 = _betas(betas)
            partials = ratio = None
            if adapt:
                partials = torch.empty(2 * tables.n_chunks, dtype=torch.float32, device=device)
                ratio = torch.empty(tables.n, dtype=torch.float32, device=device)
            if tables.n_chunks:
                _launch(f"lamb_moments<{ct}>", tables.n_chunks, device, (
                    *_layout(tables), b1, b2, one_b1, one_b2, log_b1, log_b2, np.float32(eps),
                    np.float32(weight_decay), cuda.pointer(scale), cuda.pointer(inf),
                    cuda.pointer(partials)))
                if adapt:
                    _launch("lamb_trust_ratios", tables.n, device, (
                        cuda.pointer(tables.first_chunk), np.int64(tables.n),
                        cuda.pointer(partials), cuda.pointer(inf), cuda.pointer(ratio)))
                _launch(f"lamb_apply<{ct}>", tables.n_chunks, device, (
                    *_layout(tables), np.float32(lr), log_b1, log_b2, np.float32(eps),
                    np.float32(weight_decay), cuda.pointer(inf), cuda.pointer(ratio)))
            _advance(tables, inf, device)


Roles = tuple[list[torch.Tensor], ...]  # params, grads, exp_avgs, exp_avg_sqs, steps


def _partitions(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                steps: Sequence[torch.Tensor]) -> list[tuple[torch.dtype, Roles]]:
    """The tensors by parameter dtype (a launch takes one), checked for what the kernels
    assume: one CUDA device, contiguous parameters, fp32 state; gradients made contiguous."""
    groups: dict[torch.dtype, Roles] = {}
    for k, (w, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps,
                                               strict=True)):
        cuda.ctype(w.dtype)
        if g.dtype != w.dtype or g.shape != w.shape:
            raise ValueError(f"parameter {k}: gradient {g.dtype} {tuple(g.shape)} for a "
                             f"{w.dtype} {tuple(w.shape)} parameter")
        if any(s.dtype != torch.float32 for s in (m, v, step)) or step.numel() != 1:
            raise TypeError(f"parameter {k}: the kernels keep fp32 exp_avg, exp_avg_sq and a "
                            f"one-element fp32 step")
        if any(t.device != w.device for t in (g, m, v, step)):
            raise ValueError(f"parameter {k}: its gradient and state are not all on {w.device}")
        cuda.require_contiguous(param=w, exp_avg=m, exp_avg_sq=v)
        roles = groups.setdefault(w.dtype, ([], [], [], [], []))
        for role, t in zip(roles, (w, g.contiguous(), m, v, step)):
            role.append(t)
    devices = {roles[0][0].device for roles in groups.values()}
    if len(devices) > 1:
        raise ValueError(f"the multi-tensor step takes one device's tensors, got {devices}")
    return list(groups.items())


def _betas(betas: tuple[float, float]) -> tuple[np.float32, ...]:
    """beta1, beta2, 1 - beta1, 1 - beta2, log beta1, log beta2, computed in double."""
    b1, b2 = betas
    logs = [math.log(b) if b > 0 else -math.inf for b in betas]  # beta 0: no bias correction
    return tuple(np.float32(x) for x in (b1, b2, 1.0 - b1, 1.0 - b2, *logs))


def _layout(tables: Tables) -> tuple:
    return (cuda.pointer(tables.tensors), np.int64(tables.n), cuda.pointer(tables.chunks),
            np.int64(tables.n_chunks), np.int64(CHUNK))


def _scalar(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A GradScaler's scale or found_inf as the fp32 scalar on `device` the kernels read."""
    return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)


def _advance(tables: Tables, found_inf: torch.Tensor | None, device: torch.device) -> None:
    _launch("advance_steps", -(-tables.n // THREADS), device, (
        cuda.pointer(tables.tensors), np.int64(tables.n), cuda.pointer(found_inf)))


def _launch(name: str, blocks: int, device: torch.device, args: tuple) -> None:
    cuda.launch(SOURCE, name, blocks, THREADS, args, device=device, name_expressions=NAMES)


CUPY = CupyMultiTensor()
