"""The MLM loss: the kernel's arithmetic in torch (`TorchMlmLoss`), plugged into the autograd
Function the CUDA kernel runs in, against torch's cross-entropy in float64: per-row losses,
argmax hits (ties: the first maximal index), gradients under `sum / denominator` and per-row
upstream gradients, central differences; the in-place contract's guards; a real backward
through the pretraining head; and the CPU dispatch (torch's cross-entropy, logits untouched)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bertrt
from bertrt.kernels import cuda
from bertrt.kernels.mlm_loss import IGNORE_INDEX, fused_mlm_loss, mlm_loss
from bertrt.kernels.mlm_loss.function import CUPY, TORCH, MlmLossFunction
from bertrt.train import losses

TOL = {"rtol": 1e-10, "atol": 1e-12}


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits (9, 13) and labels: two rows ignored, two labelled by their argmax
    (hits), one with a tie for the maximum (label at the tie's second index: no hit)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(9, 13, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 13, (9,), generator=gen)
    labels[[1, 5]] = IGNORE_INDEX
    labels[[2, 6]] = logits[[2, 6]].argmax(-1)
    logits[3, 4] = logits[3, 9] = logits[3].max() + 1.0
    labels[3] = 9
    return logits, labels


def reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (0 on ignored rows) and hits, by torch."""
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    hit = (logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)
    return loss, hit


def test_rows_and_hits_match_cross_entropy() -> None:
    logits, labels = problem()
    loss, hit = MlmLossFunction.apply(logits.clone(), labels, TORCH)
    want_loss, want_hit = reference(logits, labels)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, **TOL)
    assert torch.equal(hit, want_hit) and hit[[2, 6]].all() and not hit[3]
    assert loss[[1, 5]].eq(0).all()


@pytest.mark.parametrize("upstream", ["sum-over-denominator", "per-row"])
def test_gradient_matches_cross_entropy(upstream: str) -> None:
    logits, labels = problem()
    weights = torch.rand(len(labels), generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)

    def reduce(rows: torch.Tensor) -> torch.Tensor:
        # the training loss is a sum over the rows divided by a step-wide denominator
        return rows.sum() / 37.0 if upstream == "sum-over-denominator" else (rows * weights).sum()

    # the Function consumes its input: give it an intermediate, whose gradient goes to a leaf
    leaf = logits.clone().requires_grad_(True)
    loss, _ = MlmLossFunction.apply(leaf * 1.0, labels, TORCH)
    (got,) = torch.autograd.grad(reduce(loss), leaf)
    ref = logits.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reduce(reference(ref, labels)[0]), ref)
    torch.testing.assert_close(got, want, **TOL)
    assert got[[1, 5]].eq(0).all() and got.abs().max() > 0


def test_gradient_matches_central_differences() -> None:
    """gradcheck by hand: a backward consumes the logits, so gradcheck's repeated backwards
    through one graph are refused; each forward here is fresh."""
    logits, labels = problem(seed=2)
    logits, labels = logits[:4, :5].contiguous(), labels[:4].clamp(max=4)  # rows 1 ignored
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)

    def f(x: torch.Tensor) -> float:
        return float((MlmLossFunction.apply(x.clone(), labels, TORCH)[0] * weights).sum())

    leaf = logits.clone().requires_grad_(True)
    loss, _ = MlmLossFunction.apply(leaf * 1.0, labels, TORCH)
    (analytic,) = torch.autograd.grad((loss * weights).sum(), leaf)
    numeric = torch.zeros_like(logits)
    h = 1e-6
    for index in torch.cartesian_prod(*(torch.arange(n) for n in logits.shape)):
        step = torch.zeros_like(logits)
        step[tuple(index)] = h
        numeric[tuple(index)] = (f(logits + step) - f(logits - step)) / (2 * h)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_all_rows_ignored() -> None:
    logits, _ = problem()
    labels = torch.full((len(logits),), IGNORE_INDEX)
    leaf = logits.clone().requires_grad_(True)
    loss_sum, correct, count = fused_mlm_loss(leaf * 1.0, labels, TORCH)
    (grad,) = torch.autograd.grad(loss_sum / 1.0, leaf)
    assert float(loss_sum.detach()) == 0.0 and int(correct) == 0 and int(count) == 0
    assert grad.eq(0).all()


def test_backward_writes_into_the_logits_buffer() -> None:
    logits, labels = problem()
    leaf = logits.clone().requires_grad_(True)
    consumed = leaf * 1.0
    seen = []
    consumed.register_hook(seen.append)
    loss, _ = MlmLossFunction.apply(consumed, labels, TORCH)
    loss.sum().backward()
    # the gradient of the logits is their own buffer, which now holds it
    assert seen[0].data_ptr() == consumed.data_ptr()
    torch.testing.assert_close(consumed, leaf.grad, **TOL)


def test_guards_of_the_in_place_contract() -> None:
    logits, labels = problem()
    with pytest.raises(ValueError, match="leaf"):
        MlmLossFunction.apply(logits.clone().requires_grad_(True), labels, TORCH)

    leaf = logits.clone().requires_grad_(True)
    loss, _ = MlmLossFunction.apply(leaf * 1.0, labels, TORCH)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.sum().backward()

    consumed = leaf * 1.0
    loss, _ = MlmLossFunction.apply(consumed, labels, TORCH)
    consumed.add_(1.0)  # changed between the forward and the backward that reads it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_other_users_of_the_logits_get_their_gradient_or_an_error() -> None:
    """Another node that saved the logits either runs its backward before ours (it then read
    them intact: the gradient is right) or after (the version counter raises)."""
    logits, labels = problem()
    ref = logits.clone().requires_grad_(True)
    want_loss = reference(ref, labels)[0].sum() + ref.pow(2).sum()
    (want,) = torch.autograd.grad(want_loss, ref)

    leaf = logits.clone().requires_grad_(True)
    consumed = leaf * 1.0
    loss, _ = MlmLossFunction.apply(consumed, labels, TORCH)
    square = consumed.pow(2).sum()  # created after: its backward runs first
    (got,) = torch.autograd.grad(loss.sum() + square, leaf)
    torch.testing.assert_close(got, want, **TOL)

    consumed = leaf * 1.0
    square = consumed.pow(2).sum()  # created before: it unpacks the logits after our backward
    loss, _ = MlmLossFunction.apply(consumed, labels, TORCH)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss.sum() + square, leaf)


def test_pretraining_head_backward_through_the_fused_loss(monkeypatch) -> None:
    """`losses.pretraining_loss` with the fused path (torch implementation) on a real
    pretraining head in float64: no version error from the decoder's backward, and the same
    loss, stats and parameter gradients as torch's cross-entropy."""
    config = bertrt.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=16, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 12), generator=gen)
    positions = torch.tensor([1, 4, 5, 14, 23, 27, 32])
    labels = torch.randint(5, 60, (len(positions),), generator=gen)
    labels[2] = IGNORE_INDEX
    batch = {"mlm_labels": labels, "nsp_labels": torch.tensor([0, 1, 0])}
    denominators = torch.tensor([6.0, 3.0], dtype=torch.float64)

    def float64_reference(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss, hit = reference(x, y)  # the dispatcher's reference computes in float32
        return loss.sum(), hit.sum(), (y != IGNORE_INDEX).sum()

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        net = bertrt.Model.from_config(config, head="pretraining", seed=3).to_torch().double()
        monkeypatch.setattr(losses, "mlm_loss", (lambda x, y: fused_mlm_loss(x, y, TORCH))
                            if fused else float64_reference)
        out = net(ids, masked_positions=positions)
        loss, stats = losses.pretraining_loss(out, batch, denominators)
        loss.backward()
        monkeypatch.undo()
        return loss.detach(), stats, {n: p.grad for n, p in net.named_parameters()}

    loss_a, stats_a, grads_a = run(fused=True)
    loss_b, stats_b, grads_b = run(fused=False)
    torch.testing.assert_close(loss_a, loss_b, **TOL)
    torch.testing.assert_close(stats_a, stats_b, **TOL)
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_a[name], grad, **TOL, msg=name)


def test_cpu_dispatch_is_torch_cross_entropy_and_keeps_the_logits() -> None:
    logits, labels = problem()
    x = logits.float().clone().requires_grad_(True)
    y = x * 1.0
    kept = y.detach().clone()
    loss_sum, correct, count = mlm_loss(y, labels)
    loss_sum.backward()
    want = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.equal(loss_sum.detach(), want)  # the same operations: bitwise
    assert int(correct) == int(reference(logits, labels)[1].sum()) and int(count) == 7
    assert torch.equal(y.detach(), kept)


def kernel_signature(source: str, name: str) -> list[type]:
    """The numpy type each parameter of `__global__ void name(...)` in `source` takes."""
    match = re.search(rf"__global__ void {re.escape(name)}\(([^)]*)\)", source)
    assert match, f"{name} is not in the source"
    params = [p.strip() for p in match.group(1).split(",")]
    return [np.uint64 if "*" in p else np.int64 if "long long" in p else np.float32
            for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_launches_match_the_kernels_signatures(monkeypatch, dtype) -> None:
    """The CuPy path's launches, recorded on CPU: each names an instantiated kernel and passes
    arguments of the C signature's count and widths (CuPy would not notice a mismatch)."""
    launches = []
    monkeypatch.setattr(cuda, "launch", lambda source, name, grid, block, args, **kw:
                        launches.append((source, name, grid, block, args,
                                         kw["name_expressions"])))
    logits, labels = problem()
    logits = logits.to(dtype)
    _, lse, _ = CUPY.forward(logits, labels)
    CUPY.backward(logits, labels, lse, torch.ones(()).expand(len(labels)))
    assert [launch[1] for launch in launches] == [
        f"mlm_loss_forward<{cuda.ctype(dtype)}>", f"mlm_loss_backward<{cuda.ctype(dtype)}>"]
    for source, name, grid, block, args, expressions in launches:
        assert name in expressions and grid == len(labels) and block % 32 == 0
        assert [type(a) for a in args] == kernel_signature(source.read_text(),
                                                           name.split("<")[0]), name
    assert launches[1][4][4] == 0  # the expanded upstream gradient: stride 0
