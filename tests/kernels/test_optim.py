"""Multi-tensor AdamW and LAMB, torch implementation (what `FusedAdamW` and `FusedLamb` run on
CPU): against torch.optim.AdamW (single-tensor path) and a LAMB step written out, in float64,
over several steps with decay / no-decay groups at two learning rates and a parameter that
misses a gradient; found_inf skipping; grad_scale unscaling, through a real GradScaler too;
checkpoints moving between these optimizers and torch's AdamW / `Lamb`; and the optimizer
`build_optimizer` picks."""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

from bertrt.kernels import cuda
from bertrt.kernels.optim.kernel import CHUNK, ROLES, host_tables
from bertrt.kernels.optim.kernel import SOURCE as OPTIM_CU
from bertrt.train.optim import (
    ADAM_EPS,
    BETAS,
    FusedAdamW,
    FusedLamb,
    Lamb,
    build_optimizer,
    param_groups,
)

LR, DECAY, STEPS = 3e-2, 0.1, 4
SHAPES = [(6, 4), (5,), (3, 3), (4,), (7,)]
TOL = {"rtol": 1e-12, "atol": 1e-14}


Grads = list[list[torch.Tensor | None]]
Problem = tuple[list[torch.Tensor], Grads, list[str], dict[str, float]]


def make_problem(dtype: torch.dtype = torch.float64, seed: int = 0) -> Problem:
    """Parameters, per-step gradients (parameter 4 has none at step 2), and the groups
    `param_groups` builds with two learning-rate scales (tensor 3 is all zeros: LAMB's trust
    ratio falls back to 1)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    params[3].zero_()
    grads = [[torch.randn(s, generator=gen, dtype=dtype) * (k + 1) for s in SHAPES]
             for k in range(STEPS)]
    grads[1][4] = None
    names = [f"p{k}" for k in range(len(SHAPES))]
    scales = {"p0": 1.0, "p1": 1.0, "p2": 0.5, "p3": 0.5, "p4": 0.5}
    return params, grads, names, scales


def groups_of(live: list[torch.nn.Parameter], names: list[str], scales: dict[str, float],
              lamb: bool) -> list[dict]:
    """As `build_optimizer` makes them: no decay on p1 and p4 ("biases"), lr times scale."""
    groups = param_groups(zip(names, live), DECAY, {"p1", "p4"}, scales)
    for group in groups:
        group["lr"] = LR * group.pop("lr_scale")
        if not lamb:
            group.pop("adapt")
    return groups


def run(make: Callable[[list[dict]], torch.optim.Optimizer], params: list[torch.Tensor],
        grads: Grads, names: list[str], scales: dict[str, float], lamb: bool = False,
        steps: int = STEPS) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """`make(groups)` applied to copies of `params` for `steps` steps of `grads`."""
    live = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make(groups_of(live, names, scales, lamb))
    for step_grads in grads[:steps]:
        for p, g in zip(live, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach() for p in live], opt


def lamb_written_out(params: list[torch.Tensor], grads: Grads, adapt: list[bool],
                     decay: list[float], lrs: list[float]) -> list[torch.Tensor]:
    """LAMB (You et al., 2019) in float64 per tensor; a tensor without a gradient skips the
    step (its own step count does not advance)."""
    (b1, b2), eps = BETAS, ADAM_EPS
    xs = [p.double().clone() for p in params]
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros_like(x) for x in xs]
    ts = [0] * len(xs)
    for step_grads in grads:
        for k, g in enumerate(step_grads):
            if g is None:
                continue
            ts[k] += 1
            t = ts[k]
            ms[k] = b1 * ms[k] + (1 - b1) * g
            vs[k] = b2 * vs[k] + (1 - b2) * g * g
            u = (ms[k] / (1 - b1**t)) / ((vs[k] / (1 - b2**t)).sqrt() + eps) + decay[k] * xs[k]
            x_norm, u_norm = float(xs[k].norm()), float(u.norm())
            ratio = x_norm / u_norm if adapt[k] and x_norm > 0 and u_norm > 0 else 1.0
            xs[k] = xs[k] - lrs[k] * ratio * u
    return xs


def test_adamw_matches_torch_adamw() -> None:
    problem = make_problem()
    got, ours = run(lambda g: FusedAdamW(g, lr=LR, betas=BETAS, eps=ADAM_EPS), *problem)
    want, theirs = run(lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, eps=ADAM_EPS,
                                                   foreach=False), *problem)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=f"parameter {k}")
    for pa, pb in zip((p for g in ours.param_groups for p in g["params"]),
                      (p for g in theirs.param_groups for p in g["params"])):
        sa, sb = ours.state[pa], theirs.state[pb]
        assert float(sa["step"]) == float(sb["step"])
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], **TOL)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], **TOL)
    assert sa["step"].dtype == torch.float32  # as torch's fused AdamW keeps it


def test_lamb_matches_lamb_written_out_and_lamb() -> None:
    params, grads, names, scales = make_problem()
    got, _ = run(lambda g: FusedLamb(g, lr=LR, betas=BETAS, eps=ADAM_EPS), params, grads,
                 names, scales, lamb=True)
    no_decay = [k in (1, 4) for k in range(len(SHAPES))]
    want = lamb_written_out(params, grads, adapt=[not n for n in no_decay],
                            decay=[0.0 if n else DECAY for n in no_decay],
                            lrs=[LR * scales[n] for n in names])
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=f"parameter {k}")
    # and today's Lamb in float32 (its state is fp32 whatever the parameters)
    f32 = [p.float() for p in params], [[g if g is None else g.float() for g in s]
                                        for s in grads], names, scales
    got, _ = run(lambda g: FusedLamb(g, lr=LR, betas=BETAS, eps=ADAM_EPS), *f32, lamb=True)
    want, _ = run(lambda g: Lamb(g, lr=LR, betas=BETAS, eps=ADAM_EPS), *f32, lamb=True)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"parameter {k}")


@pytest.mark.parametrize("make", [FusedAdamW, FusedLamb])
def test_found_inf_skips_the_step_entirely(make) -> None:
    params, grads, names, scales = make_problem()
    live, opt = run(lambda g: make(g, lr=LR), params, grads, names, scales,
                    lamb=make is FusedLamb, steps=2)
    before = ([p.clone() for p in live], copy.deepcopy(opt.state_dict()))
    for p, g in zip(opt.param_groups[0]["params"], grads[2]):
        p.grad = g.clone()
    opt.found_inf = torch.ones((), dtype=torch.float32)
    opt.step()
    after = opt.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(live, before[0]))
    for key, entry in before[1]["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]),
                               torch.as_tensor(value)), name
    del opt.found_inf
    opt.step()  # found_inf gone: the step happens, and counts
    assert not torch.equal(live[0], before[0][0])
    assert int(opt.state_dict()["state"][0]["step"]) == 3


@pytest.mark.parametrize("make", [FusedAdamW, FusedLamb])
def test_grad_scale_divides_the_gradients(make) -> None:
    params, grads, names, scales = make_problem()
    want, _ = run(lambda g: make(g, lr=LR), params, grads, names, scales,
                  lamb=make is FusedLamb)

    def scaled(groups: list[dict]) -> torch.optim.Optimizer:
        opt = make(groups, lr=LR)
        opt.grad_scale = torch.tensor(1024.0)
        return opt

    big = [[None if g is None else g * 1024 for g in s] for s in grads]
    got, _ = run(scaled, params, big, names, scales, lamb=make is FusedLamb)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_a_gradscaler_skips_inf_steps_and_resumes() -> None:
    """The contract a GradScaler keeps with `_step_supports_amp_scaling` optimizers: it sets
    `grad_scale` and `found_inf` on them and calls `step` whatever found_inf holds."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3).double()
    opt = FusedAdamW(net.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 4, dtype=torch.float64)
    start = [p.detach().clone() for p in net.parameters()]
    scaler.scale(net(x).square().sum()).backward()
    net.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), start))
    for state in opt.state.values():
        assert float(state["step"]) == 0 and not state["exp_avg"].any()
    assert scaler.get_scale() == 2.0**9

    opt.zero_grad()
    scaler.scale(net(x).square().sum()).backward()
    grads = [p.grad / 2.0**9 for p in net.parameters()]
    scaler.step(opt)
    assert all(float(s["step"]) == 1 for s in opt.state.values())
    # the step took the unscaled gradients: torch's AdamW from the same start with them
    plain = [torch.nn.Parameter(q.clone()) for q in start]
    for p, g in zip(plain, grads):
        p.grad = g
    torch.optim.AdamW(plain, lr=LR, foreach=False).step()
    for p, q in zip(net.parameters(), plain):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL)


@pytest.mark.parametrize(("ours", "theirs", "lamb"), [
    (lambda g: FusedAdamW(g, lr=LR), lambda g: torch.optim.AdamW(g, lr=LR, fused=True), False),
    (lambda g: FusedLamb(g, lr=LR), lambda g: Lamb(g, lr=LR), True),
], ids=["adamw", "lamb"])
@pytest.mark.parametrize("direction", ["ours-to-theirs", "theirs-to-ours"])
def test_checkpoints_resume_across_implementations(ours, theirs, lamb, direction) -> None:
    params, grads, names, scales = make_problem(torch.float32)
    first, second = (ours, theirs) if direction == "ours-to-theirs" else (theirs, ours)
    whole, _ = run(first, params, grads, names, scales, lamb=lamb)

    live = [torch.nn.Parameter(p.clone()) for p in params]
    opt = first(groups_of(live, names, scales, lamb))
    for step, step_grads in enumerate(grads):
        if step == 2:  # a checkpoint: saved, reloaded by the other implementation
            saved = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
            opt = second(groups_of(live, names, scales, lamb))
            opt.load_state_dict(saved)
        for p, g in zip(live, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    for k, (a, b) in enumerate(zip(live, whole)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6, msg=f"parameter {k}")


def test_state_dicts_have_todays_layout() -> None:
    params, grads, names, scales = make_problem(torch.float32)
    for ours, theirs, lamb in ((FusedAdamW, lambda g: torch.optim.AdamW(g, fused=True), False),
                               (FusedLamb, Lamb, True)):
        a = run(ours, params, grads, names, scales, lamb=lamb, steps=2)[1].state_dict()
        b = run(theirs, params, grads, names, scales, lamb=lamb, steps=2)[1].state_dict()
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys()
        for key in a["state"]:
            sa, sb = a["state"][key], b["state"][key]
            assert sa.keys() == sb.keys()
            assert type(sa["step"]) is type(sb["step"])
            if torch.is_tensor(sb["step"]):
                assert (sa["step"].dtype, sa["step"].device) == (sb["step"].dtype,
                                                                 sb["step"].device)
            for name in ("exp_avg", "exp_avg_sq"):
                assert sa[name].dtype == sb[name].dtype == torch.float32


def test_build_optimizer_picks_the_kernels_for_cuda_parameters(monkeypatch) -> None:
    named = [("w", torch.nn.Parameter(torch.zeros(3))), ("b", torch.nn.Parameter(torch.zeros(2)))]
    assert type(build_optimizer(named, "adamw", LR, DECAY, {"b"})) is torch.optim.AdamW
    assert type(build_optimizer(named, "lamb", LR, DECAY, {"b"})) is Lamb
    monkeypatch.setattr(cuda, "wants_kernel", lambda *tensors: True)  # as CUDA with CuPy
    assert type(build_optimizer(named, "adamw", LR, DECAY, {"b"})) is FusedAdamW
    assert type(build_optimizer(named, "lamb", LR, DECAY, {"b"})) is FusedLamb


def _roundtrip(state: dict) -> io.BytesIO:
    """`state` through torch.save, as a checkpoint file holds it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_kernel_tables_cover_every_element_once() -> None:
    """The launch tables `optim.cu` reads (built on the host, so checked here): rows in the
    kernel's `enum Role` order, and chunks that cover each tensor's elements exactly once."""
    enum = re.search(r"enum Role \{([^}]*)\}", OPTIM_CU.read_text()).group(1)
    assert [name.split("=")[0].strip() for name in enum.split(",")] == [
        "k" + "".join(part.title() for part in role.split("_")) for role in ROLES]
    sizes = [1, 3, CHUNK, CHUNK + 1, 0, 3 * CHUNK - 7]
    roles = [[torch.zeros(n) for n in sizes] for _ in range(5)]
    host, n, c = host_tables(*roles)
    tensors, owner = host[:6 * n].reshape(6, n), host[6 * n:6 * n + c]
    start, first = host[6 * n + c:6 * n + 2 * c], host[6 * n + 2 * c:]
    assert len(first) == n + 1 and first[-1] == c
    for r, role in enumerate(roles):
        assert list(tensors[r]) == [t.data_ptr() for t in role]
    assert list(tensors[5]) == sizes
    for k, size in enumerate(sizes):
        mine = np.flatnonzero(owner == k)
        assert list(mine) == list(range(first[k], first[k + 1]))
        covered = np.concatenate([np.arange(s, min(s + CHUNK, size)) for s in start[mine]]
                                 or [np.zeros(0, dtype=np.int64)])
        assert list(covered) == list(range(size))


def kernel_signature(source: str, name: str) -> list[type]:
    """The numpy type each parameter of `__global__ void name(...)` in `source` takes."""
    match = re.search(rf"__global__ void {re.escape(name)}\(([^)]*)\)", source)
    assert match, f"{name} is not in the source"
    params = [p.strip() for p in match.group(1).split(",")]
    return [np.uint64 if "*" in p else np.int64 if "long long" in p else np.float32
            for p in params]


@pytest.mark.parametrize("adapt", [True, False])
def test_launches_match_the_kernels_signatures(monkeypatch, adapt) -> None:
    """The CuPy path's launches, recorded on CPU: each names an instantiated kernel and passes
    arguments of the C signature's count and widths (CuPy would not notice a mismatch)."""
    from bertrt.kernels.optim.kernel import CUPY

    launches = []
    monkeypatch.setattr(cuda, "launch", lambda source, name, grid, block, args, **kw:
                        launches.append((source, name, args, kw["name_expressions"])))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    params = [torch.zeros(n) for n in (3, CHUNK + 1)]
    state = [[torch.zeros(n) for n in (3, CHUNK + 1)] for _ in range(3)]
    steps = [torch.zeros(()) for _ in params]
    hyper = {"lr": LR, "betas": BETAS, "eps": ADAM_EPS, "weight_decay": DECAY,
             "grad_scale": torch.ones(()), "found_inf": torch.zeros(())}
    CUPY.adamw_step(params, *state, steps, **hyper)
    CUPY.lamb_step(params, *state, steps, adapt=adapt, **hyper)
    names = [name for _, name, _, _ in launches]
    assert names == ["adamw_step<float>", "advance_steps", "lamb_moments<float>",
                     *(["lamb_trust_ratios"] if adapt else []), "lamb_apply<float>",
                     "advance_steps"]
    for source, name, args, expressions in launches:
        assert name in expressions
        assert [type(a) for a in args] == kernel_signature(source.read_text(),
                                                           name.split("<")[0]), name
