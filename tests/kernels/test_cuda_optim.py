"""The multi-tensor AdamW and LAMB kernels on CUDA against float64 references on CPU:
torch.optim.AdamW and LAMB written out, over 4 steps, tensors of odd sizes (1, 3, 4097, more
than a chunk, 1M) in decay / no-decay groups at two learning rates, fp32 master weights and
bf16 parameters; found_inf (nothing changes, no host synchronisation), grad_scale,
determinism, and a checkpoint into torch's fused AdamW. Skips without CuPy and CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from bertrt.kernels import cuda  # noqa: E402
from bertrt.kernels.optim.kernel import CHUNK  # noqa: E402
from bertrt.train.optim import ADAM_EPS, BETAS, FusedAdamW, FusedLamb  # noqa: E402

SIZES = [1, 3, 4097, CHUNK + 5, 1 << 20, 768]
LR, DECAY, STEPS = 1e-2, 0.05, 4
#: groups as `param_groups` makes them: (tensor indices, weight decay, adapt, lr factor)
GROUPS = [([0, 2, 4], DECAY, True, 1.0), ([1, 5], 0.0, False, 1.0), ([3], DECAY, True, 0.5)]


def problem(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Parameters (tensor 1 zero: LAMB's ratio 1) and per-step gradients, on CUDA."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(n, generator=gen, device="cuda").to(dtype) for n in SIZES]
    params[1].zero_()
    grads = [[(0.1 * (k + 1) * torch.randn(n, generator=gen, device="cuda")).to(dtype)
              for n in SIZES] for k in range(STEPS)]
    return params, grads


def run(make, params, grads, device, dtype=None):  # noqa: ANN001, ANN201
    """`make(groups)` over copies of `params` on `device` (in `dtype`), stepped by `grads`."""
    live = [torch.nn.Parameter(p.detach().to(device, dtype).clone()) for p in params]
    opt = make([{"params": [live[k] for k in index], "weight_decay": wd, "adapt": adapt,
                 "lr": LR * scale} for index, wd, adapt, scale in GROUPS])
    for step in grads:
        for p, g in zip(live, step):
            p.grad = g.to(device, p.dtype).clone()
        opt.step()
    return [p.detach() for p in live], opt


def lamb_float64(params, grads):  # noqa: ANN001, ANN201
    """LAMB (You et al., 2019) written out in float64 on CPU, per tensor."""
    (b1, b2), eps = BETAS, ADAM_EPS
    xs = [p.double().cpu() for p in params]
    ms, vs = [torch.zeros_like(x) for x in xs], [torch.zeros_like(x) for x in xs]
    setting = {k: (wd, adapt, scale) for index, wd, adapt, scale in GROUPS for k in index}
    for t, step in enumerate(grads, start=1):
        for k, g in enumerate(step):
            wd, adapt, scale = setting[k]
            g = g.double().cpu()
            ms[k] = b1 * ms[k] + (1 - b1) * g
            vs[k] = b2 * vs[k] + (1 - b2) * g * g
            u = (ms[k] / (1 - b1**t)) / ((vs[k] / (1 - b2**t)).sqrt() + eps) + wd * xs[k]
            xn, un = float(xs[k].norm()), float(u.norm())
            ratio = xn / un if adapt and xn > 0 and un > 0 else 1.0
            xs[k] = xs[k] - LR * scale * ratio * u
    return xs


def adamw_float64(params, grads):  # noqa: ANN001, ANN201
    """torch.optim.AdamW (single-tensor path) in float64 on CPU."""
    def make(groups: list[dict]) -> torch.optim.Optimizer:
        for g in groups:
            g.pop("adapt")
        return torch.optim.AdamW(groups, betas=BETAS, eps=ADAM_EPS, foreach=False)

    return run(make, params, grads, "cpu", torch.float64)[0]


def assert_params_close(got, want, dtype) -> None:  # noqa: ANN001
    # fp32 over 4 steps: ~1e-6 of the update; bf16: the parameters' own rounding
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7,
                                                                       "atol": 2**-7}
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double().cpu(), b, **tol, msg=f"tensor {k} ({SIZES[k]})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_kernel_matches_torch_adamw_float64(dtype) -> None:
    assert cuda.wants_kernel(torch.zeros(1, device="cuda"))
    params, grads = problem(dtype)
    got, opt = run(lambda g: FusedAdamW(_no_adapt(g), betas=BETAS, eps=ADAM_EPS), params,
                   grads, "cuda")
    assert_params_close(got, adamw_float64(params, grads), dtype)
    for state in opt.state.values():
        assert state["exp_avg"].dtype == torch.float32 and float(state["step"]) == STEPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lamb_kernel_matches_lamb_float64(dtype) -> None:
    params, grads = problem(dtype)
    got, _ = run(lambda g: FusedLamb(g, betas=BETAS, eps=ADAM_EPS), params, grads, "cuda")
    assert_params_close(got, lamb_float64(params, grads), dtype)


def test_lamb_kernel_is_deterministic() -> None:
    params, grads = problem(torch.float32)
    a, _ = run(lambda g: FusedLamb(g), params, grads, "cuda")
    b, _ = run(lambda g: FusedLamb(g), params, grads, "cuda")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("make", [lambda g: FusedAdamW(_no_adapt(g)), FusedLamb],
                         ids=["adamw", "lamb"])
def test_found_inf_skips_on_the_device(make) -> None:
    params, grads = problem(torch.float32)
    live, opt = run(make, params, grads[:2], "cuda")
    before = [p.clone() for p in live]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    for p, g in zip(live, grads[2]):
        p.grad = g.clone()
    opt.found_inf = torch.ones((), device="cuda")
    opt.grad_scale = torch.full((), 4.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the step must not wait for the device
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(live, before))
    for p, s in opt.state.items():
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]), key


@pytest.mark.parametrize("make", [lambda g: FusedAdamW(_no_adapt(g)), FusedLamb],
                         ids=["adamw", "lamb"])
def test_grad_scale_divides_the_gradients(make) -> None:
    params, grads = problem(torch.float32)
    want, _ = run(make, params, grads, "cuda")

    def scaled(groups: list[dict]) -> torch.optim.Optimizer:
        opt = make(groups)
        opt.grad_scale = torch.full((), 2.0**12, device="cuda")
        return opt

    got, _ = run(scaled, params, [[g * 2.0**12 for g in s] for s in grads], "cuda")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_checkpoint_into_torchs_fused_adamw() -> None:
    params, grads = problem(torch.float32)
    whole = adamw_float64(params, grads)
    live, opt = run(lambda g: FusedAdamW(_no_adapt(g), betas=BETAS, eps=ADAM_EPS), params,
                    grads[:2], "cuda")
    theirs = torch.optim.AdamW([dict(g) for g in opt.param_groups], fused=True)
    theirs.load_state_dict(opt.state_dict())
    for step in grads[2:]:
        for p, g in zip(live, step):
            p.grad = g.clone()
        theirs.step()
    assert_params_close(live, whole, torch.float32)


def _no_adapt(groups: list[dict]) -> list[dict]:
    """AdamW's groups: `param_groups`' without LAMB's `adapt`."""
    return [{k: v for k, v in g.items() if k != "adapt"} for g in groups]
