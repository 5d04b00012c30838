"""The MLM loss kernel on CUDA against torch's cross-entropy in float64 on the same (rounded)
logits: per-row losses, hits, the sums `mlm_loss` returns, and the gradient written over the
logits, for fp32/bf16/fp16, BERT's vocabulary and small or odd ones, 1 row and more rows than
the kernel's grid (it strides), ignored rows, all rows ignored. Skips without CuPy and CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("cupy")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from bertrt.kernels import cuda  # noqa: E402
from bertrt.kernels.mlm_loss import IGNORE_INDEX, mlm_loss  # noqa: E402
from bertrt.kernels.mlm_loss.function import CUPY, MAX_BLOCKS, MlmLossFunction  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: (rows, vocab): BERT's vocabulary, a vocabulary not a multiple of 4, a tiny one with more
#: rows than one launch's blocks, a single row, a single class.
SHAPES = [(37, 30522), (1, 30522), (5, 4097), (MAX_BLOCKS + 37, 7), (3, 1)]
#: The gradient's bound: its dtype's rounding (relative), fp32's below 1e-5.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}


def problem(rows: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on CUDA in `dtype`; labels with every 5th row ignored and every 3rd the argmax."""
    gen = torch.Generator(device="cuda").manual_seed(rows * 7 + vocab)
    logits = (3.0 * torch.randn(rows, vocab, generator=gen, device="cuda")).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen, device="cuda")
    labels[::3] = logits[::3].float().argmax(-1)
    labels[1::5] = IGNORE_INDEX
    return logits, labels


def reference(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 per-row losses, hits and d(sum(loss * weights))/d logits."""
    x = logits.double().requires_grad_(True)
    loss = F.cross_entropy(x, labels, ignore_index=IGNORE_INDEX, reduction="none")
    (grad,) = torch.autograd.grad((loss * weights).sum(), x)
    hit = (x.detach().argmax(-1) == labels) & (labels != IGNORE_INDEX)
    return loss.detach(), hit, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_float64_cross_entropy(shape, dtype) -> None:
    logits, labels = problem(*shape, dtype)
    weights = torch.rand(shape[0], device="cuda", dtype=torch.float64) / 37.0
    want_loss, want_hit, want_grad = reference(logits, labels, weights)
    source = logits.clone().requires_grad_(True)
    consumed = source * 1  # exact: an intermediate for the Function to consume
    loss, hit = MlmLossFunction.apply(consumed, labels, CUPY)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(hit, want_hit)
    # per-row upstream gradients; the backward writes the gradient over the logits
    (loss * weights.float()).sum().backward()
    assert torch.equal(consumed, source.grad)
    # atol: fp16's subnormal spacing, where the smallest probabilities land
    torch.testing.assert_close(source.grad.double(), want_grad, rtol=GRAD_RTOL[dtype],
                               atol=2**-24)
    assert source.grad[1::5].eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_mlm_loss_through_autograd(dtype, monkeypatch) -> None:
    """`mlm_loss` as training calls it: logits from a decoder matmul, loss / denominator; the
    sums and the decoder's input gradient against float64."""
    assert cuda.wants_kernel(torch.zeros(1, device="cuda"))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 means fp32
    rows, hidden, vocab = 64, 32, 30522
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype).requires_grad_(True)
    w = (0.3 * torch.randn(vocab, hidden, generator=gen, device="cuda")).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen, device="cuda")
    labels[::4] = IGNORE_INDEX
    loss_sum, correct, count = mlm_loss(h @ w.T, labels)
    (loss_sum / 48.0).backward()

    h64 = h.detach().double().requires_grad_(True)
    logits64 = h64 @ w.double().T
    want = F.cross_entropy(logits64, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    (want / 48.0).backward()
    keep = labels != IGNORE_INDEX
    assert int(count) == int(keep.sum())
    # the kernel's hits are on the rounded logits of the dtype's matmul
    assert int(correct) == int(((h @ w.T).float().argmax(-1) == labels)[keep].sum())
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(loss_sum.double(), want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=tol, atol=tol * 1e-2)


def test_all_rows_ignored() -> None:
    logits, _ = problem(6, 30522, torch.bfloat16)
    labels = torch.full((6,), IGNORE_INDEX, device="cuda")
    leaf = logits.float().requires_grad_(True)
    loss_sum, correct, count = mlm_loss(leaf * 1.0, labels)
    loss_sum.backward()
    assert float(loss_sum) == 0.0 and int(correct) == 0 and int(count) == 0
    assert leaf.grad.eq(0).all()


def test_refuses_what_it_cannot_take() -> None:
    logits, labels = problem(4, 10, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        mlm_loss(logits.T.contiguous().T, labels)
    with pytest.raises(TypeError, match="int64"):
        mlm_loss(logits, labels.int())
    with pytest.raises(ValueError, match="leaf"):
        mlm_loss(logits.clone().requires_grad_(True), labels)
