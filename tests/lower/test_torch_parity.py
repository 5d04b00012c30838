"""The torch lowering against Hugging Face `transformers` on the same weights.

The reference is always transformers (never bertrt itself): fp32 parity of both lowerings
(fused and as built) on the real MiniLM-L6 checkpoint and on small random configurations, the
three heads, masked positions, weight sharing, gradients, autocast, dropout and input checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

import bertrt

TOL = 1e-4  # DESIGN.md: fp32 max abs difference on every non-padded position
LOWERINGS = {"fused": True, "unfused": False}


# --------------------------------------------------------------------------- helpers
def make_batch(vocab: int, type_vocab: int, lengths: list[int], seq: int, seed: int = 0):
    """Right-padded ids/mask/types. Padded positions hold random (non-pad) ids on purpose: an
    implementation that ignored the mask would then disagree with the reference."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = torch.randint(0, type_vocab, (len(lengths), seq), generator=gen)
    return ids, mask, types


def cases(max_pos: int) -> dict[str, tuple[list[int], int]]:
    """Name -> (lengths, seq): a ragged right-padded batch, batch 1 x seq 1, and full length."""
    s = max(4, max_pos // 2)
    return {
        "padded": ([s, s - 3, 1, s // 2], s),
        "b1s1": ([1], 1),
        "full": ([max_pos, max_pos // 3], max_pos),
    }


def assert_rows_close(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, what: str,
                      tol: float = TOL) -> None:
    """Max abs difference over the non-padded positions of (B, S, ...) tensors."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    keep = mask.bool()
    diff = (ours[keep] - ref[keep]).abs().max().item()
    assert diff < tol, f"{what}: max abs diff {diff:.3g} on non-padded positions"


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert diff < tol, f"{what}: max abs diff {diff:.3g}"


def save_and_load(hf: torch.nn.Module, path: Path) -> bertrt.Model:
    hf.save_pretrained(path)
    return bertrt.load(path)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def minilm(minilm_dir: Path):
    model = bertrt.load(minilm_dir)
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    return model, hf


@pytest.fixture(scope="module")
def random_pair(random_config: dict[str, Any], make_hf_model, tmp_path_factory):
    hf = make_hf_model("BertModel", seed=1, **random_config)
    model = save_and_load(hf, tmp_path_factory.mktemp("random"))
    return model, hf


def check_encoder(model: bertrt.Model, hf: torch.nn.Module, lengths: list[int], seq: int,
                  seed: int = 0) -> None:
    cfg = model.config
    ids, mask, types = make_batch(cfg.vocab_size, cfg.type_vocab_size, lengths, seq, seed)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        for label, fuse in LOWERINGS.items():
            out = model.to_torch(fuse=fuse).eval()(ids, mask, types)
            assert_rows_close(out["last_hidden_state"], ref.last_hidden_state, mask,
                              f"{label} last_hidden_state")
            assert_close(out["pooler_output"], ref.pooler_output, f"{label} pooler_output")


# --------------------------------------------------------------------------- 1. encoder parity
@pytest.mark.parametrize("case", ["padded", "b1s1", "full"])
def test_minilm_matches_transformers(minilm, case: str) -> None:
    model, hf = minilm
    lengths, seq = {"padded": ([24, 17, 1, 9], 24), "b1s1": ([1], 1),
                    "full": ([512], 512)}[case]
    check_encoder(model, hf, lengths, seq)


@pytest.mark.parametrize("case", ["padded", "b1s1", "full"])
def test_random_config_matches_transformers(random_pair, case: str) -> None:
    model, hf = random_pair
    lengths, seq = cases(model.config.max_position_embeddings)[case]
    check_encoder(model, hf, lengths, seq, seed=3)


def test_minilm_tokenized_text(minilm) -> None:
    """Real text through the model's own tokenizer: ids, mask and pair types as users give them."""
    model, hf = minilm
    enc = model.tokenizer(["a short one", "the quick brown fox jumps over the lazy dog"],
                          ["with a pair", "and another sentence here"], max_length=32)
    ids, mask, types = (torch.as_tensor(enc[k]) for k in
                        ("input_ids", "attention_mask", "token_type_ids"))
    assert bool((mask == 0).any()) and bool((types == 1).any())
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = model.to_torch().eval()(ids, mask, types)
    assert_rows_close(out["last_hidden_state"], ref.last_hidden_state, mask, "last_hidden_state")
    assert_close(out["pooler_output"], ref.pooler_output, "pooler_output")


def test_defaults_for_optional_inputs(minilm) -> None:
    """No attention_mask means all ones; no token_type_ids means all zeros — as in the reference."""
    model, hf = minilm
    ids, _, _ = make_batch(model.config.vocab_size, 2, [7, 7], 7, seed=5)
    with torch.no_grad():
        ref = hf(input_ids=ids)
        for label, fuse in LOWERINGS.items():
            out = model.to_torch(fuse=fuse).eval()(ids)
            assert_close(out["last_hidden_state"], ref.last_hidden_state, f"{label} hidden")


# --------------------------------------------------------------------------- 2. heads
HEAD_CLASSES = {
    "pretraining": "BertForPreTraining",
    "classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
}
HEAD_CONFIGS = ["h32-n4-l2-gelu_new", "h48-n3-l1-relu"]


@pytest.fixture(scope="module")
def head_pair(request, random_config, make_hf_model, tmp_path_factory):
    head = request.param
    hf = make_hf_model(HEAD_CLASSES[head], seed=2,
                       num_labels=3 if head != "pretraining" else None, **random_config)
    model = save_and_load(hf, tmp_path_factory.mktemp(head))
    return head, model, hf


@pytest.mark.parametrize("random_config", HEAD_CONFIGS, indirect=True)
@pytest.mark.parametrize("head_pair", list(HEAD_CLASSES), indirect=True)
def test_head_matches_transformers(head_pair) -> None:
    head, model, hf = head_pair
    assert model.head == head
    cfg = model.config
    s = cfg.max_position_embeddings
    ids, mask, types = make_batch(cfg.vocab_size, cfg.type_vocab_size, [s, 5, 1], s, seed=7)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types,
                 output_hidden_states=True)
        for label, fuse in LOWERINGS.items():
            out = model.to_torch(fuse=fuse).eval()(ids, mask, types)
            assert_rows_close(out["last_hidden_state"], ref.hidden_states[-1], mask,
                              f"{label} last_hidden_state")
            if head == "pretraining":
                assert_rows_close(out["prediction_logits"], ref.prediction_logits, mask,
                                  f"{label} prediction_logits")
                assert_close(out["seq_relationship_logits"], ref.seq_relationship_logits,
                             f"{label} seq_relationship_logits")
            elif head == "classification":
                assert out["logits"].shape == (3, 3)
                assert_close(out["logits"], ref.logits, f"{label} logits")
            else:
                assert "pooler_output" not in out  # the reference tagger has no pooler
                assert out["logits"].shape == (3, s, 3)
                assert_rows_close(out["logits"], ref.logits, mask, f"{label} logits")


@pytest.mark.parametrize("random_config", ["h32-n4-l2-gelu_new"], indirect=True)
@pytest.mark.parametrize("head_pair", ["pretraining"], indirect=True)
@pytest.mark.parametrize("form", ["bool", "flat"])
def test_masked_positions_select_rows(head_pair, form: str) -> None:
    _, model, hf = head_pair
    cfg = model.config
    ids, mask, types = make_batch(cfg.vocab_size, cfg.type_vocab_size, [12, 6, 9], 12, seed=9)
    b, s = ids.shape
    if form == "bool":
        positions = torch.zeros(b, s, dtype=torch.bool)
        positions[0, [0, 3, 11]] = True
        positions[2, [2, 8]] = True
        flat = positions.reshape(-1).nonzero().squeeze(1)  # row-major: the documented order
    else:
        positions = flat = torch.tensor([13, 0, 35, 13, 24, 5])  # unsorted, repeated
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        expected = ref.prediction_logits.reshape(b * s, -1)[flat]
        for label, fuse in LOWERINGS.items():
            out = model.to_torch(fuse=fuse).eval()(ids, mask, types, masked_positions=positions)
            assert_close(out["prediction_logits"], expected, f"{label} masked prediction_logits")
            assert_close(out["seq_relationship_logits"], ref.seq_relationship_logits,
                         f"{label} seq_relationship_logits")


# --------------------------------------------------------------------------- 3. training surface
SMALL = dict(vocab_size=60, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
             intermediate_size=48, max_position_embeddings=16, type_vocab_size=2)


@pytest.mark.parametrize("fuse", list(LOWERINGS.values()), ids=list(LOWERINGS))
def test_parameters_share_storage_and_train_the_model(fuse: bool, tmp_path: Path) -> None:
    model = bertrt.Model.from_config(bertrt.BertConfig(**SMALL), head="pretraining", seed=0)
    before = {k: v.detach().clone() for k, v in model.weights.items()}
    net = model.to_torch(fuse=fuse)
    named = dict(net.named_parameters())
    assert set(named) == set(model.weights)
    for name, p in named.items():
        assert p.data_ptr() == model.weights[name].data_ptr(), name
    other = model.to_torch(fuse=not fuse)  # a second lowering shares the same tensors too
    for name, p in other.named_parameters():
        assert p.data_ptr() == named[name].data_ptr(), name

    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    ids, mask, types = make_batch(60, 2, [16, 9], 16)
    out = net.train()(ids, mask, types)
    (out["prediction_logits"].logsumexp(-1).mean() + out["seq_relationship_logits"].sum()
     ).backward()
    opt.step()
    saved = load_file(str(model.save(tmp_path) / "model.safetensors"))
    for name in ("bert.embeddings.word_embeddings.weight",
                 "bert.encoder.layer.1.attention.self.query.weight",
                 "cls.predictions.transform.dense.weight"):
        assert not torch.equal(saved[name], before[name]), f"{name}: step not saved"
        assert torch.equal(saved[name], named[name].detach()), name


@pytest.mark.parametrize("fuse", list(LOWERINGS.values()), ids=list(LOWERINGS))
def test_gradients_reach_every_parameter(fuse: bool) -> None:
    cfg = bertrt.BertConfig(**SMALL, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = bertrt.Model.from_config(cfg, head="pretraining", seed=1)
    net = model.to_torch(fuse=fuse).train()
    ids, mask, types = make_batch(60, 2, [16, 11, 4], 16, seed=1)
    out = net(ids, mask, types)
    gen = torch.Generator().manual_seed(0)
    loss = sum((v * torch.randn(v.shape, generator=gen)).sum() for v in out.values())
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


@pytest.mark.parametrize("random_config", ["h32-n4-l2-gelu_new"], indirect=True)
@pytest.mark.parametrize("head_pair", ["pretraining"], indirect=True)
@pytest.mark.parametrize("fuse", list(LOWERINGS.values()), ids=list(LOWERINGS))
def test_gradients_match_transformers(head_pair, fuse: bool) -> None:
    """Backward of one loss over every output, against the reference's gradients by name."""
    _, model, hf = head_pair
    cfg = model.config
    ids, mask, types = make_batch(cfg.vocab_size, cfg.type_vocab_size, [12, 7], 12, seed=4)
    net = model.to_torch(fuse=fuse).eval()
    out = net(ids, mask, types)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    ref = {"last_hidden_state": ref.hidden_states[-1], "pooler_output": None,
           "prediction_logits": ref.prediction_logits,
           "seq_relationship_logits": ref.seq_relationship_logits}
    gen = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(v.shape, generator=gen) * (mask[..., None] if v.dim() == 3 else 1)
               for k, v in out.items()}
    sum((out[k] * w).sum() for k, w in weights.items() if ref[k] is not None).backward()
    sum((ref[k] * w).sum() for k, w in weights.items() if ref[k] is not None).backward()
    hf_params = dict(hf.named_parameters())
    try:
        for name, p in net.named_parameters():
            g_ref = hf_params[name].grad
            scale = max(1.0, g_ref.abs().max().item())
            assert_close(p.grad / scale, g_ref / scale, f"grad {name}", tol=TOL)
    finally:
        hf.zero_grad(set_to_none=True)
        net.zero_grad(set_to_none=True)


def test_autocast_bf16_close_to_fp32(minilm) -> None:
    """bf16 has an 8-bit significand (unit roundoff 2^-9 ~ 2e-3 per rounding). Every matmul
    input is rounded, and errors compound over 6 layers roughly like a random walk, so a few
    1e-2 relative error is what bf16 gives; 5e-2 leaves margin while a real bug (mask ignored,
    a layer skipped, wrong scale) gives errors of order 1. LayerNorm outputs are O(1), so
    relative is taken against the fp32 tensor's norm (rows) and max (pooler)."""
    model, _ = minilm
    ids, mask, types = make_batch(model.config.vocab_size, 2, [32, 20], 32, seed=2)
    for label, fuse in LOWERINGS.items():
        net = model.to_torch(fuse=fuse).eval()
        with torch.no_grad():
            ref = net(ids, mask, types)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = net(ids, mask, types)
        keep = mask.bool()
        a, b = low["last_hidden_state"].float()[keep], ref["last_hidden_state"][keep]
        rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()
        assert rel < 5e-2, f"{label}: bf16 relative error {rel:.3g}"
        pool_err = (low["pooler_output"].float() - ref["pooler_output"]).abs().max().item()
        assert pool_err < 5e-2 * ref["pooler_output"].abs().max().item(), label


@pytest.mark.parametrize("fuse", list(LOWERINGS.values()), ids=list(LOWERINGS))
@pytest.mark.parametrize("hidden,attn", [(0.1, 0.0), (0.0, 0.1)], ids=["hidden", "attention"])
def test_dropout_only_in_train_mode(fuse: bool, hidden: float, attn: float) -> None:
    cfg = bertrt.BertConfig(**SMALL, hidden_dropout_prob=hidden,
                            attention_probs_dropout_prob=attn)
    net = bertrt.Model.from_config(cfg, head="classification", seed=0).to_torch(fuse=fuse)
    ids, mask, types = make_batch(60, 2, [16, 10], 16)
    with torch.no_grad():
        net.train()
        a, b = net(ids, mask, types), net(ids, mask, types)
        assert not torch.equal(a["last_hidden_state"], b["last_hidden_state"])
        net.eval()
        c, d = net(ids, mask, types), net(ids, mask, types)
    for key in c:
        assert torch.equal(c[key], d[key]), key
    assert not torch.equal(a["last_hidden_state"], c["last_hidden_state"])


# --------------------------------------------------------------------------- 5. bad input
@pytest.fixture(scope="module")
def small_net():
    cfg = bertrt.BertConfig(**SMALL)
    return bertrt.Model.from_config(cfg, head="pretraining", seed=0)


def one_line_error(exc: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("fuse", list(LOWERINGS.values()), ids=list(LOWERINGS))
def test_too_long_input_is_input_error(small_net, fuse: bool) -> None:
    net = small_net.to_torch(fuse=fuse).eval()
    ids = torch.ones(1, 17, dtype=torch.long)
    with pytest.raises(bertrt.InputError) as exc:
        net(ids)
    one_line_error(exc, "input_ids", "max_position_embeddings")


@pytest.mark.parametrize("fuse", list(LOWERINGS.values()), ids=list(LOWERINGS))
@pytest.mark.parametrize("field,bad", [("input_ids", -1), ("input_ids", 60),
                                       ("token_type_ids", -1), ("token_type_ids", 2)])
def test_out_of_range_ids_are_input_errors(small_net, fuse: bool, field: str, bad: int) -> None:
    net = small_net.to_torch(fuse=fuse).eval()
    inputs = {"input_ids": torch.ones(2, 8, dtype=torch.long),
              "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    inputs[field][1, 5] = bad
    with pytest.raises(bertrt.InputError) as exc:
        net(**inputs)
    one_line_error(exc, field, str(bad))


@pytest.mark.parametrize("kwargs,field", [
    (dict(masked_positions=torch.tensor([16])), "masked_positions"),  # == batch*seq
    (dict(masked_positions=torch.tensor([-1])), "masked_positions"),
    (dict(masked_positions=torch.ones(2, 7, dtype=torch.bool)), "masked_positions"),
    (dict(attention_mask=torch.ones(2, 7, dtype=torch.long)), "attention_mask"),
    (dict(token_type_ids=torch.zeros(2, 9, dtype=torch.long)), "token_type_ids"),
    (dict(input_ids=torch.ones(8, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.ones(2, 0, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.ones(2, 8)), "input_ids"),
], ids=["mp-high", "mp-negative", "mp-shape", "mask-shape", "types-shape", "ids-1d",
        "ids-empty", "ids-float"])
def test_malformed_inputs_are_input_errors(small_net, kwargs: dict, field: str) -> None:
    net = small_net.to_torch().eval()
    inputs = {"input_ids": torch.ones(2, 8, dtype=torch.long), **kwargs}
    with pytest.raises(bertrt.InputError) as exc:
        net(**inputs)
    one_line_error(exc, field)
