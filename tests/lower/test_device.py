"""Device and dtype moves keep one set of tensors: `Model.weights`, the lowered module's
parameters and what its generated forward computes with are the same objects after
`net.to(...)` and `model.to(...)`, and training after a move trains what `model.save()` writes.

The meta device stands in for CUDA (a move across device types: `nn.Module._apply` registers new
Parameters); a dtype move checks values; the CUDA tests run where a GPU is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bertrt
from bertrt.lower.to_torch import LoweredModule

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
_FORWARDS = ("_forward", "_forward_inference", "_forward_masked", "_forward_masked_inference")


def _model(head: str = "pretraining") -> bertrt.Model:
    config = bertrt.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=16, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
    return bertrt.Model.from_config(config, head=head, seed=0)


@contextlib.contextmanager
def _conversion(mode: str) -> Iterator[None]:
    """torch.__future__'s ways for `nn.Module._apply` to treat a converted parameter."""
    future = torch.__future__
    before = (future.get_overwrite_module_params_on_conversion(),
              future.get_swap_module_params_on_conversion())
    future.set_overwrite_module_params_on_conversion(mode == "overwrite")
    future.set_swap_module_params_on_conversion(mode == "swap")
    try:
        yield
    finally:
        future.set_overwrite_module_params_on_conversion(before[0])
        future.set_swap_module_params_on_conversion(before[1])


def _record(net: LoweredModule) -> list[tuple[torch.Tensor, ...]]:
    """Wrap the generated forwards so each call's parameter tuple is recorded."""
    calls: list[tuple[torch.Tensor, ...]] = []
    for attr in _FORWARDS:
        fn = getattr(net, attr, None)
        if fn is None:
            continue

        def recording(params, *args, _fn=fn):
            calls.append(tuple(params))
            return _fn(params, *args)

        setattr(net, attr, recording)
    return calls


def _assert_one_set(model: bertrt.Model, net: LoweredModule,
                    used: tuple[torch.Tensor, ...]) -> None:
    names = list(model.graph.params)
    assert len(used) == len(names)
    for name, tensor in zip(names, used):
        param = net.get_parameter(name)
        assert tensor is param, name  # the forward computes with the module's parameter
        assert model.weights[name] is param, name  # ... which is the model's weight


def _ids(packed: bool, device: str = "cpu") -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 6, 8, 3, 0]], device=device)
    if packed:
        return {"input_ids": torch.tensor([2, 5, 7, 9, 3, 2, 6, 8, 3], device=device),
                "cu_seqlens": torch.tensor([0, 5, 9])}
    return {"input_ids": ids}


# ---------------------------------------------------------------------- structure (meta)
@pytest.mark.parametrize("mode", ["default", "overwrite", "swap"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_move_across_devices_keeps_one_set_of_tensors(mode: str, packed: bool) -> None:
    model = _model()
    net = model.to_torch(packed=packed)
    net.check_inputs = False  # a range check reads values, which meta tensors lack
    with _conversion(mode):
        net.to("meta")
    assert net.device.type == "meta"
    assert all(p.device.type == "meta" for p in net.parameters())
    assert all(t.device.type == "meta" for t in model.weights.values())
    calls = _record(net)
    out = net(**_ids(packed))
    net(**_ids(packed), masked_positions=torch.tensor([1, 3]))  # the masked-MLM forward
    assert out["last_hidden_state"].device.type == "meta"
    assert len(calls) == 2
    for used in calls:
        _assert_one_set(model, net, used)


def test_the_forward_reads_a_replaced_parameter() -> None:
    # load_state_dict(assign=True) and direct assignment bypass `_apply`: the forward still
    # computes with whatever is registered now
    model = _model("none")
    net = model.to_torch()
    name = "embeddings.LayerNorm.weight"
    replacement = torch.nn.Parameter(torch.full_like(net.get_parameter(name), 2.0))
    net.load_state_dict({name: replacement}, strict=False, assign=True)
    calls = _record(net)
    net(**_ids(False))
    assert calls[0][list(model.graph.params).index(name)] is net.get_parameter(name)


# ---------------------------------------------------------------------- values (dtype move)
def _train_step(net: LoweredModule, inputs: dict[str, torch.Tensor]) -> None:
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    out = net(**inputs)
    (out["last_hidden_state"].square().mean() + out["pooler_output"].sum()).backward()
    opt.step()


@pytest.mark.parametrize("mode", ["default", "overwrite", "swap"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_after_a_dtype_move_trains_what_save_writes(mode: str, packed: bool,
                                                            tmp_path: Path) -> None:
    model = _model("none")
    before = {k: v.detach().clone() for k, v in model.weights.items()}
    net = model.to_torch(packed=packed)
    with _conversion(mode):
        net.to(torch.float64)
    _train_step(net, _ids(packed))
    name = "encoder.layer.0.attention.self.query.weight"
    trained = net.get_parameter(name).detach()
    assert trained.dtype == torch.float64
    assert not torch.equal(trained.float(), before[name])  # the step changed it
    for key, param in net.named_parameters():
        assert model.weights[key] is param
    saved = bertrt.load(model.save(tmp_path / "m"))
    assert torch.allclose(saved.weights[name].double(), trained, atol=1e-6)


def test_model_to_moves_every_module_lowered_from_it() -> None:
    model = _model()
    nets = [model.to_torch(), model.to_torch(packed=True)]
    model.to(dtype=torch.float64)
    for net in nets:
        calls = _record(net)
        ids = _ids(isinstance(net, bertrt.lower.to_torch.PackedModule))
        assert net(**ids)["last_hidden_state"].dtype == torch.float64
        _assert_one_set(model, net, calls[0])
    # integer tensors would keep their dtype; floating ones all moved
    assert all(t.dtype == torch.float64 for t in model.weights.values())


def test_model_to_where_the_tensors_are_changes_nothing() -> None:
    model = _model()
    net = model.to_torch()
    params = [p for p in net.parameters()]
    assert model.to("cpu") is model and model.to(dtype=torch.float32) is model
    assert all(a is b for a, b in zip(params, net.parameters()))
    assert all(model.weights[k] is p for k, p in net.named_parameters())


# ---------------------------------------------------------------------- CUDA
@CUDA
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("how", ["net.to", "model.to"])
def test_cuda_training_trains_what_save_writes(packed: bool, how: str, tmp_path: Path) -> None:
    model = _model("none")
    if how == "model.to":
        net = model.to("cuda").to_torch(packed=packed)
    else:
        net = model.to_torch(packed=packed).to("cuda")
    calls = _record(net)
    inputs = {k: v.cuda() if k != "cu_seqlens" else v for k, v in _ids(packed).items()}
    _train_step(net, inputs)
    _assert_one_set(model, net, calls[0])
    name = "encoder.layer.1.output.dense.weight"
    trained = net.get_parameter(name).detach().cpu()
    saved = bertrt.load(model.save(tmp_path / "m"))
    assert torch.equal(saved.weights[name], trained)
