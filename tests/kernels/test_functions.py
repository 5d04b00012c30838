"""The kernels' autograd Functions on CPU, with the torch implementation of their explicit
formulas plugged in (the formulas the .cu files implement):

* `torch.autograd.gradcheck` in float64 checks each backward against the forward's numerical
  Jacobian, dropout included (the mask is a function of the seed, fixed per check);
* the forward (and its gradients) equals the float64 reference fed the same dropout mask;
* the dispatchers run the reference on CPU tensors and with kernels switched off, and pass
  their arguments to the Function as it expects (checked with the torch implementation
  standing in for the CUDA one), contiguous or not.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import gradcheck

from bertrt.kernels import cuda
from bertrt.kernels.bias_gelu import function as bias_gelu_fn
from bertrt.kernels.bias_gelu import reference as bias_gelu_ref
from bertrt.kernels.embed_layer_norm import function as embed_fn
from bertrt.kernels.embed_layer_norm import reference as embed_ref
from bertrt.kernels.skip_layer_norm import function as skip_fn
from bertrt.kernels.skip_layer_norm import reference as skip_ref
from bertrt.kernels.skip_layer_norm.function import draw_seed, torch_keep_mask

# The packages (`bertrt.kernels` re-exports functions under the same names as its packages).
skip_mod = importlib.import_module("bertrt.kernels.skip_layer_norm")
bias_gelu_mod = importlib.import_module("bertrt.kernels.bias_gelu")
embed_mod = importlib.import_module("bertrt.kernels.embed_layer_norm")

EPS = 1e-3  # large enough that a formula with another eps fails
SEED = 1234
F64 = torch.float64


def randn(*shape: int, seed: int, grad: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=F64).requires_grad_(grad)


def assert_same_with_grads(got: torch.Tensor, want: torch.Tensor,
                           leaves: dict[str, torch.Tensor]) -> None:
    """Outputs equal, and so are the gradients of every leaf for one random upstream."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    upstream = randn(*got.shape, seed=99, grad=False)
    names = list(leaves)
    g_got = torch.autograd.grad(got, [leaves[n] for n in names], upstream)
    g_want = torch.autograd.grad(want, [leaves[n] for n in names], upstream)
    for name, g, w in zip(names, g_got, g_want):
        assert w.abs().max() > 0, f"d/d{name} is zero: the case does not test it"
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, name=name: f"d/d{name}: {m}")


# --- SkipLayerNorm -----------------------------------------------------------------------------

def skip_inputs(with_bias: bool, h: int = 12) -> dict[str, torch.Tensor | None]:
    return {"x": randn(2, 5, h, seed=1), "skip": randn(2, 5, h, seed=2),
            "weight": (1.0 + 0.2 * randn(h, seed=3, grad=False)).requires_grad_(),
            "beta": randn(h, seed=4), "bias": randn(h, seed=5) if with_bias else None}


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_skip_layer_norm_gradcheck(with_bias, p):
    t = skip_inputs(with_bias)

    def fn(x, skip, weight, beta, bias):
        return skip_fn.SkipLayerNormFunction.apply(x, skip, weight, beta, bias, EPS, p, SEED,
                                                   F64, skip_fn.TORCH)

    assert gradcheck(fn, tuple(t.values()))


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_skip_layer_norm_formulas_match_reference(with_bias, p):
    t = skip_inputs(with_bias)
    got = skip_fn.SkipLayerNormFunction.apply(*t.values(), EPS, p, SEED, F64, skip_fn.TORCH)
    mask = torch_keep_mask(SEED, (10, 12), p, torch.device("cpu")).view(2, 5, 12)
    if p > 0:
        assert 0 < mask.sum() < mask.numel()  # some dropped, some kept
    want = skip_ref.skip_layer_norm(*t.values(), eps=EPS, dropout=p, training=True, mask=mask)
    assert_same_with_grads(got, want, {k: v for k, v in t.items() if v is not None})


# --- BiasGelu ----------------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_gradcheck(approximate):
    x, bias = 2.0 * randn(3, 4, 8, seed=1, grad=False), randn(8, seed=2)
    x.requires_grad_()

    def fn(x, bias):
        return bias_gelu_fn.BiasGeluFunction.apply(x, bias, approximate, F64, bias_gelu_fn.TORCH)

    assert gradcheck(fn, (x, bias))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_formulas_match_reference(approximate):
    x, bias = randn(3, 4, 8, seed=1), randn(8, seed=2)
    got = bias_gelu_fn.BiasGeluFunction.apply(x, bias, approximate, F64, bias_gelu_fn.TORCH)
    want = bias_gelu_ref.bias_gelu(x, bias, approximate=approximate)
    assert_same_with_grads(got, want, {"x": x, "bias": bias})


def test_bias_gelu_refuses_an_unknown_form():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        bias_gelu_fn.BiasGeluFunction.apply(randn(2, 4, seed=1), randn(4, seed=2), "sigmoid",
                                            F64, bias_gelu_fn.TORCH)


# --- EmbedLayerNorm ----------------------------------------------------------------------------

B, S, H, VOCAB, POSITIONS, TYPES = 2, 4, 8, 7, 6, 3


def embed_inputs() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    ids[0, :3] = 4  # a repeated id: its row gathers several gradients
    types = torch.randint(0, TYPES, (B, S), generator=gen)
    tables = {"word": randn(VOCAB, H, seed=1), "position": randn(POSITIONS, H, seed=2),
              "token_type": randn(TYPES, H, seed=3),
              "weight": (1.0 + 0.2 * randn(H, seed=4, grad=False)).requires_grad_(),
              "bias": randn(H, seed=5)}
    return ids, types, tables


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_types", [True, False], ids=["types", "no-types"])
def test_embed_layer_norm_gradcheck(with_types, p):
    ids, types, t = embed_inputs()
    types = types if with_types else None

    def fn(*tables):
        return embed_fn.EmbedLayerNormFunction.apply(ids, types, *tables, EPS, p, SEED, F64,
                                                     embed_fn.TORCH)

    assert gradcheck(fn, tuple(t.values()))


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_types", [True, False], ids=["types", "no-types"])
def test_embed_layer_norm_formulas_match_reference(with_types, p):
    ids, types, t = embed_inputs()
    types = types if with_types else None
    got = embed_fn.EmbedLayerNormFunction.apply(ids, types, *t.values(), EPS, p, SEED, F64,
                                                embed_fn.TORCH)
    mask = torch_keep_mask(SEED, (B * S, H), p, torch.device("cpu")).view(B, S, H)
    want = embed_ref.embed_layer_norm(ids, types, *t.values(), eps=EPS, dropout=p,
                                      training=True, mask=mask)
    assert_same_with_grads(got, want, t)


# --- dispatch ----------------------------------------------------------------------------------

def test_wants_kernel_only_for_cuda_tensors_with_kernels_on(monkeypatch):
    monkeypatch.setattr(cuda, "cupy_available", lambda: True)
    on_gpu, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert cuda.wants_kernel(on_gpu, None, on_gpu)
    assert not cuda.wants_kernel(on_gpu, on_cpu)
    with cuda.use_kernels(False):
        assert not cuda.wants_kernel(on_gpu)
    assert cuda.wants_kernel(on_gpu)


def test_environment_switch_turns_kernels_off():
    code = "from bertrt.kernels import cuda; print(cuda.kernels_enabled())"
    env = {**os.environ, cuda.ENV_SWITCH: "reference"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "False"


def _calls(name: str) -> list[tuple[str, torch.Tensor]]:
    """Each dispatcher on small float64 CPU inputs: (its Function's name, the output)."""
    ids, types, t = embed_inputs()
    s = skip_inputs(with_bias=True)
    runs = {
        "SkipLayerNormFunction": lambda: skip_mod.skip_layer_norm(*s.values(), eps=EPS),
        "BiasGeluFunction": lambda: bias_gelu_mod.bias_gelu(s["x"], s["bias"]),
        "EmbedLayerNormFunction": lambda: embed_mod.embed_layer_norm(ids, types, *t.values(),
                                                                     eps=EPS),
    }
    return runs[name]()


FUNCTIONS = ["SkipLayerNormFunction", "BiasGeluFunction", "EmbedLayerNormFunction"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_cpu_tensors_run_the_reference(name, monkeypatch):
    monkeypatch.setattr(cuda, "cupy_available", lambda: True)  # as on a GPU machine
    for enabled in (True, False):
        with cuda.use_kernels(enabled):
            out = _calls(name)
        assert name not in type(out.grad_fn).__name__


@pytest.fixture
def torch_impl_as_kernel(monkeypatch):
    """Every dispatcher takes its kernel path, with the torch implementation standing in
    for the CUDA one (so the path's argument handling runs on CPU)."""
    for mod, fn in ((skip_mod, skip_fn), (bias_gelu_mod, bias_gelu_fn), (embed_mod, embed_fn)):
        monkeypatch.setattr(mod.cuda, "wants_kernel", lambda *t: True)
        monkeypatch.setattr(mod, "CUDA", fn.TORCH)
        monkeypatch.setitem(cuda.CTYPES, F64, "double")


@pytest.mark.parametrize("name", FUNCTIONS)
def test_kernel_path_matches_reference(name, torch_impl_as_kernel):
    out = _calls(name)
    assert name in type(out.grad_fn).__name__
    ids, types, t = embed_inputs()
    s = skip_inputs(with_bias=True)
    want = {
        "SkipLayerNormFunction": lambda: skip_ref.skip_layer_norm(*s.values(), eps=EPS),
        "BiasGeluFunction": lambda: bias_gelu_ref.bias_gelu(s["x"], s["bias"]),
        "EmbedLayerNormFunction": lambda: embed_ref.embed_layer_norm(ids, types, *t.values(),
                                                                     eps=EPS),
    }[name]()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # inference: the same numbers, nothing recorded
        out = _calls(name)
    assert out.grad_fn is None
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_kernel_path_copies_non_contiguous_inputs(torch_impl_as_kernel):
    s = skip_inputs(with_bias=True)
    x_t = s["x"].detach().transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not x_t.is_contiguous()
    got = skip_mod.skip_layer_norm(x_t, s["skip"], s["weight"], s["beta"], s["bias"], eps=EPS)
    want = skip_ref.skip_layer_norm(*s.values(), eps=EPS)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got = bias_gelu_mod.bias_gelu(x_t, s["bias"])
    torch.testing.assert_close(got, bias_gelu_ref.bias_gelu(s["x"], s["bias"]))


def test_kernel_path_dropout_is_governed_by_manual_seed(torch_impl_as_kernel):
    s = skip_inputs(with_bias=True)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return skip_mod.skip_layer_norm(*s.values(), eps=EPS, dropout=0.5, training=True)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    torch.manual_seed(0)
    mask = torch_keep_mask(draw_seed(), (10, 12), 0.5, torch.device("cpu")).view(2, 5, 12)
    want = skip_ref.skip_layer_norm(*s.values(), eps=EPS, dropout=0.5, training=True, mask=mask)
    torch.testing.assert_close(run(0), want, rtol=1e-10, atol=1e-10)
    # eval mode draws no seed: the generator's state is untouched
    torch.manual_seed(0)
    first = draw_seed()
    torch.manual_seed(0)
    skip_mod.skip_layer_norm(*s.values(), eps=EPS, dropout=0.5, training=False)
    assert draw_seed() == first


def test_kernel_path_refuses_bad_shapes_in_one_line(torch_impl_as_kernel):
    s = skip_inputs(with_bias=True)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(12,\)"):
        skip_mod.skip_layer_norm(s["x"], s["skip"], s["weight"], s["beta"], s["bias"][:5])
    with pytest.raises(ValueError, match="differ in shape"):
        skip_mod.skip_layer_norm(s["x"], s["skip"][:1], s["weight"], s["beta"])
    ids, types, t = embed_inputs()
    long_ids = torch.zeros(1, POSITIONS + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the position table's 6 rows"):
        embed_mod.embed_layer_norm(long_ids, None, *t.values())


def test_output_dtype_follows_the_reference():
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert skip_mod.output_dtype(x, x, None) == torch.bfloat16
    # fp32 LayerNorm parameters keep a bf16 norm bf16, in torch's layer_norm too
    assert skip_ref.skip_layer_norm(x, x, ones, zeros).dtype == torch.bfloat16
    # an fp32 bias makes the reference's x + bias fp32, and so its norm
    assert skip_mod.output_dtype(x, x, zeros) == torch.float32
    assert skip_ref.skip_layer_norm(x, x, ones, zeros, zeros).dtype == torch.float32
