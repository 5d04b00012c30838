"""Optimizers and schedules: LAMB against the paper's update written out in float64 and, with
the trust ratio off, against torch's AdamW; no weight decay on biases and LayerNorm; warm-up
and decay."""

from __future__ import annotations

import pytest
import torch

import bertrt
from bertrt.train.optim import (
    ADAM_EPS,
    BETAS,
    Lamb,
    WarmupDecay,
    build_optimizer,
    no_decay_names,
    param_groups,
)

LR, DECAY = 2e-2, 0.1


def lamb_reference(params: list[torch.Tensor], grads: list[list[torch.Tensor]],
                   adapt: list[bool], decay: list[float]) -> list[torch.Tensor]:
    """LAMB (You et al., 2019, Algorithm 2) in float64: per tensor x, at step t with gradient g,
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),   u = r + decay x,
        x = x - lr * (||x|| / ||u||) * u   (the ratio is 1 when a norm is 0, or without adapt).
    """
    (b1, b2), eps = BETAS, ADAM_EPS
    xs = [p.double().clone() for p in params]
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros_like(x) for x in xs]
    for t, step_grads in enumerate(grads, start=1):
        for k, g in enumerate(step_grads):
            g = g.double()
            ms[k] = b1 * ms[k] + (1 - b1) * g
            vs[k] = b2 * vs[k] + (1 - b2) * g * g
            r = (ms[k] / (1 - b1**t)) / ((vs[k] / (1 - b2**t)).sqrt() + eps)
            u = r + decay[k] * xs[k]
            x_norm, u_norm = float(xs[k].norm()), float(u.norm())
            ratio = x_norm / u_norm if adapt[k] and x_norm > 0 and u_norm > 0 else 1.0
            xs[k] = xs[k] - LR * ratio * u
    return xs


def run_optimizer(make: type | object, params: list[torch.Tensor],
                  grads: list[list[torch.Tensor]], groups: list[dict]) -> list[torch.Tensor]:
    """Apply `make(param groups)` to copies of `params` for each step's `grads`."""
    live = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make([{**g, "params": [live[k] for k in g["params"]]} for g in groups])  # type: ignore
    for step_grads in grads:
        for p, g in zip(live, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in live]


@pytest.fixture()
def problem() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (5,), (3, 3), (4,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[3].zero_()  # a zero tensor: ||x|| = 0, the trust ratio falls back to 1
    grads = [[torch.randn(s, generator=gen) * (k + 1) for s in shapes] for k in range(3)]
    return params, grads


def test_lamb_steps_equal_the_papers_update(problem) -> None:
    params, grads = problem
    # group 0 decays and adapts (matrices, and the zero tensor); group 1 neither (biases)
    groups = [{"params": [0, 2, 3], "weight_decay": DECAY, "adapt": True},
              {"params": [1], "weight_decay": 0.0, "adapt": False}]
    adapt, decay = [True, False, True, True], [DECAY, 0.0, DECAY, DECAY]
    for steps in (1, 3):
        got = run_optimizer(lambda g: Lamb(g, lr=LR), params, grads[:steps], groups)
        want = lamb_reference(params, grads[:steps], adapt, decay)
        for k, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6,
                                       msg=f"tensor {k} after {steps} step(s)")
    # the trust ratio matters: the adapted tensors moved otherwise than Adam's step would
    plain = lamb_reference(params, grads[:1], [False] * 4, decay)
    assert not torch.allclose(plain[0], lamb_reference(params, grads[:1], adapt, decay)[0])


def test_lamb_without_the_trust_ratio_is_adamw(problem) -> None:
    params, grads = problem
    groups = [{"params": [0, 2, 3], "weight_decay": DECAY, "adapt": False},
              {"params": [1], "weight_decay": 0.0, "adapt": False}]
    got = run_optimizer(lambda g: Lamb(g, lr=LR), params, grads, groups)
    adamw_groups = [{k: v for k, v in g.items() if k != "adapt"} for g in groups]
    want = run_optimizer(lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, eps=ADAM_EPS,
                                                     foreach=False),
                         params, grads, adamw_groups)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"tensor {k}")


def test_no_weight_decay_on_biases_and_layer_norm() -> None:
    config = bertrt.BertConfig(vocab_size=30, hidden_size=16, num_attention_heads=2,
                               num_hidden_layers=1, intermediate_size=32)
    model = bertrt.Model.from_config(config, head="pretraining")
    net = model.to_torch()
    decay, no_decay = param_groups(net.named_parameters(), 0.01, no_decay_names(model.graph))
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "bert.embeddings.word_embeddings.weight" in decayed
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert "cls.predictions.bias" in kept and "bert.embeddings.LayerNorm.weight" in kept
    assert "bert.encoder.layer.0.output.dense.bias" in kept
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(kept) == len(list(net.parameters()))
    for name in ("adamw", "lamb"):
        opt = build_optimizer(net.named_parameters(), name, 1e-3, 0.01,
                              no_decay_names(model.graph))
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


@pytest.mark.parametrize("head", ["pretraining", "classification", "token-classification"])
def test_the_graph_decides_weight_decay_as_the_names_did(head: str) -> None:
    config = bertrt.BertConfig.preset("tiny", vocab_size=50).with_labels(["a", "b", "c"])
    model = bertrt.Model.from_config(config, head=head)
    net = model.to_torch()
    by_name = {n for n, p in net.named_parameters()  # the rule before the IR decided
               if p.dim() >= 2 and "LayerNorm" not in n and not n.endswith("bias")}
    skipped = no_decay_names(model.graph)
    assert skipped == set(model.graph.params) - by_name
    decay, no_decay = param_groups(net.named_parameters(), 0.01, skipped)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == by_name
    assert {names[id(p)] for p in no_decay["params"]} == skipped


def test_warmup_then_linear_or_polynomial_decay() -> None:
    linear = WarmupDecay(warmup_steps=4, total_steps=12, power=1.0)
    assert [linear(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert linear(4) == 1.0 and linear(8) == 0.5 and 0 < linear(11) < 0.2
    poly = WarmupDecay(warmup_steps=4, total_steps=12, power=2.0)
    assert poly(8) == 0.25 and poly(3) == 1.0
    no_warmup = WarmupDecay(0, 10)
    assert no_warmup(0) == 1.0
