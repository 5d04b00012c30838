"""The inference forward (in-place adds on dead intermediates) equals the autograd forward,
and never overwrites a value that is still live through an alias."""

from __future__ import annotations

import torch

from bertrt import BertConfig, Model
from bertrt.graph import BATCH, SEQ, DType, Graph, Role
from bertrt.lower.to_torch import lower


def test_inference_forward_is_bitwise_equal_to_the_autograd_forward():
    model = Model.from_config(BertConfig.preset("tiny", vocab_size=120, num_labels=3),
                              head="pretraining", seed=3)
    ids = torch.randint(0, 120, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    for fuse in (True, False):
        net = model.to_torch(fuse=fuse).eval()
        assert "ADD_(" in net.inference_source and "ADD_(" not in net.source
        with torch.enable_grad():
            a = net(ids, mask)
        with torch.inference_mode():
            b = net(ids, mask)
        for key in a:
            assert torch.equal(a[key].detach(), b[key]), key


def test_values_alive_through_an_alias_are_not_overwritten():
    g = Graph("alias")
    x = g.add_input("input_ids", DType.INT64, (BATCH, SEQ), role=Role.INPUT_IDS)
    table = g.add_param("table", (10, 4), ("normal", 1.0))
    e = g.op("GATHER", table, x)
    d = g.op("DROPOUT", e, p=0.0)  # returns e itself in eval: d aliases e
    s = g.op("ADD", d, d)  # d dies here, but e is read again below
    g.set_output("y", g.op("ADD", s, e))
    g.verify()
    weights = {"table": torch.randn(10, 4)}
    net = lower(g, weights).eval()
    assert "ADD_(v1, v1)" not in net.inference_source  # d may not be overwritten
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        y = net(ids)["y"]
    expected = 3 * weights["table"][ids]
    assert torch.allclose(y, expected)


def test_no_grad_forward_sees_weights_updated_behind_autograd():
    """Optimizers may update parameters through `.data` or fused kernels, which bump no
    version counter: nothing in the forward may cache a function of the weights."""
    model = Model.from_config(BertConfig.preset("tiny", vocab_size=60), seed=1)
    net = model.to_torch().eval()
    ids = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(ids)["last_hidden_state"].clone()
    for name, p in net.named_parameters():
        if "attention.self" in name:
            p.data.mul_(1.5)  # not seen by the version counter
    with torch.no_grad():
        after = net(ids)["last_hidden_state"]
    with torch.enable_grad():
        reference = net(ids)["last_hidden_state"].detach()
    assert torch.equal(after, reference)
    assert not torch.allclose(after, before, atol=1e-3)


def test_to_torch_returns_eval_mode_so_calls_repeat():
    """As transformers' from_pretrained: dropout off until training code calls .train()."""
    model = Model.from_config(BertConfig.preset("tiny", vocab_size=60), head="classification")
    net = model.to_torch()
    assert not net.training
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    first, second = net(ids), net(ids)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    net.train()
    assert not torch.equal(net(ids)["logits"], net(ids)["logits"])  # dropout 0.1 is on
