"""Model dirs between bertrt and Hugging Face `transformers`, both directions, every head.

bertrt -> `model.save` -> transformers class `from_pretrained` (no missing/unexpected keys) and
transformers -> `save_pretrained` / `pytorch_model.bin` / renamed checkpoints -> `bertrt.load`,
each with identical outputs; fresh initialisation; and the one-line errors for bad dirs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import bertrt

TOL = 1e-5  # the same weights and the same arithmetic: only summation order may differ
HEADS = {
    "none": "BertModel",
    "pretraining": "BertForPreTraining",
    "classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
}
ROUNDTRIP_CONFIGS = ["h32-n4-l2-gelu_new", "h48-n3-l1-relu"]


# --------------------------------------------------------------------------- helpers
def batch(cfg: bertrt.BertConfig, lengths: list[int], seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = torch.randint(0, cfg.type_vocab_size, (len(lengths), seq), generator=gen)
    return ids, mask, types


def hf_outputs(hf: torch.nn.Module, ids, mask, types) -> dict[str, torch.Tensor]:
    """The reference's outputs under bertrt's output names."""
    out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    named = {"last_hidden_state": out.hidden_states[-1]}
    for key in ("pooler_output", "prediction_logits", "seq_relationship_logits", "logits"):
        value = getattr(out, key, None)
        if value is not None:
            named[key] = value
    return named


def assert_same_outputs(model: bertrt.Model, hf: torch.nn.Module, head: str,
                        tol: float = TOL) -> None:
    cfg = model.config
    s = cfg.max_position_embeddings
    ids, mask, types = batch(cfg, [s, 3, 1], s, seed=11)
    with torch.no_grad():
        ref = hf_outputs(hf.eval(), ids, mask, types)
        ours = model.to_torch().eval()(ids, mask, types)
    expected = {"none": {"pooler_output"},
                "pretraining": {"prediction_logits", "seq_relationship_logits"},
                "classification": {"logits"}, "token-classification": {"logits"}}[head]
    assert expected <= set(ref) & set(ours), (sorted(ref), sorted(ours))
    keep = mask.bool()
    for key in set(ref) & set(ours):
        a, b = ours[key], ref[key]
        assert a.shape == b.shape, f"{key}: {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.dim() == 3:  # (B, S, ...): only the non-padded positions are defined
            a, b = a[keep], b[keep]
        diff = (a - b).abs().max().item()
        assert diff < tol, f"{head} {key}: max abs diff {diff:.3g}"


def perturb_(model: bertrt.Model, seed: int) -> None:
    """Move every weight off its initial value (LayerNorm 1/0 and zero biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.weights.values():
            t.add_(0.1 * torch.randn(t.shape, generator=gen))


def hf_config_dir(hf: torch.nn.Module, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(path)
    return path


def one_line(exc: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    return msg


@pytest.fixture
def small_cfg() -> bertrt.BertConfig:
    return bertrt.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4,
                             num_hidden_layers=2, intermediate_size=48,
                             max_position_embeddings=16, hidden_act="gelu")


# --------------------------------------------------------------------------- bertrt -> HF
@pytest.mark.parametrize("random_config", ROUNDTRIP_CONFIGS, indirect=True)
@pytest.mark.parametrize("head", list(HEADS))
def test_bertrt_save_loads_in_transformers(random_config: dict[str, Any], head: str,
                                           tmp_path: Path) -> None:
    cfg = bertrt.BertConfig(**random_config)
    if head in ("classification", "token-classification"):
        cfg = cfg.with_labels(["neg", "neu", "pos"])
    model = bertrt.Model.from_config(cfg, head=head, seed=3)
    perturb_(model, seed=4)
    model.save(tmp_path)
    hf, info = getattr(transformers, HEADS[head]).from_pretrained(
        tmp_path, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"transformers reports {kind}: {info[kind]}"
    if head in ("classification", "token-classification"):
        assert hf.config.num_labels == 3
        assert hf.config.id2label[2] == "pos"
    assert_same_outputs(model, hf, head)


# --------------------------------------------------------------------------- HF -> bertrt
@pytest.mark.parametrize("random_config", ROUNDTRIP_CONFIGS, indirect=True)
@pytest.mark.parametrize("head", list(HEADS))
def test_transformers_save_pretrained_loads_in_bertrt(random_config: dict[str, Any], head: str,
                                                      make_hf_model, tmp_path: Path) -> None:
    labels = 3 if head in ("classification", "token-classification") else None
    hf = make_hf_model(HEADS[head], seed=5, num_labels=labels, **random_config)
    hf.save_pretrained(tmp_path)
    model = bertrt.load(tmp_path)
    assert model.head == head
    assert model.fresh_params == []
    if labels:
        assert model.config.num_labels == 3
    assert_same_outputs(model, hf, head)


@pytest.mark.parametrize("random_config", ["h32-n4-l2-gelu_new"], indirect=True)
@pytest.mark.parametrize("head", ["none", "pretraining", "classification",
                                  "token-classification"])
def test_head_detected_from_tensors_without_architectures(random_config: dict[str, Any],
                                                          head: str, make_hf_model,
                                                          tmp_path: Path) -> None:
    """A config.json without `architectures` (older or hand-written checkpoints): the head is
    read off the tensor names. The tagger differs from the sequence classifier by having no
    pooler (as in the reference), so `classifier.weight` alone does not settle it."""
    labels = 3 if head in ("classification", "token-classification") else None
    hf = make_hf_model(HEADS[head], seed=6, num_labels=labels, **random_config)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = bertrt.load(tmp_path)
    assert model.head == head
    assert_same_outputs(model, hf, head)


@pytest.mark.parametrize("random_config", ["h32-n4-l2-gelu_new"], indirect=True)
def test_tagger_without_architectures_loads_when_head_is_named(
        random_config: dict[str, Any], make_hf_model, tmp_path: Path) -> None:
    """Naming the head explicitly works as well as detecting it."""
    hf = make_hf_model("BertForTokenClassification", seed=6, num_labels=3, **random_config)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = bertrt.load(tmp_path, head="token-classification")
    assert model.fresh_params == []
    assert_same_outputs(model, hf, "token-classification")


@pytest.mark.parametrize("random_config", ["h32-n4-l2-gelu_new"], indirect=True)
@pytest.mark.parametrize("head", ["none", "pretraining", "classification"])
def test_pytorch_model_bin_only(random_config: dict[str, Any], head: str, make_hf_model,
                                tmp_path: Path) -> None:
    labels = 3 if head == "classification" else None
    hf = make_hf_model(HEADS[head], seed=7, num_labels=labels, **random_config)
    hf_config_dir(hf, tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # tied keys and buffers too
    assert not list(tmp_path.glob("*.safetensors"))
    model = bertrt.load(tmp_path)
    assert model.head == head
    assert_same_outputs(model, hf, head)


@pytest.mark.parametrize("random_config", ["h48-n3-l1-relu"], indirect=True)
def test_encoder_checkpoint_with_bert_prefix(random_config: dict[str, Any], make_hf_model,
                                             tmp_path: Path) -> None:
    hf = make_hf_model("BertModel", seed=8, **random_config)
    hf_config_dir(hf, tmp_path)
    state = {"bert." + k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    model = bertrt.load(tmp_path)
    assert model.head == "none"
    assert_same_outputs(model, hf, "none")


@pytest.mark.parametrize("random_config", ["h48-n3-l1-relu"], indirect=True)
def test_classifier_checkpoint_without_bert_prefix(random_config: dict[str, Any],
                                                   make_hf_model, tmp_path: Path) -> None:
    hf = make_hf_model("BertForSequenceClassification", seed=9, num_labels=3, **random_config)
    hf_config_dir(hf, tmp_path)
    state = {k.removeprefix("bert."): v.contiguous() for k, v in hf.state_dict().items()}
    assert "embeddings.word_embeddings.weight" in state and "classifier.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    model = bertrt.load(tmp_path)
    assert model.head == "classification"
    assert_same_outputs(model, hf, "classification")


# --------------------------------------------------------------------------- fresh weights
def test_from_config_is_seeded_and_initialised_like_bert() -> None:
    cfg = bertrt.BertConfig(vocab_size=400, hidden_size=64, num_attention_heads=4,
                            num_hidden_layers=2, intermediate_size=128,
                            max_position_embeddings=64, initializer_range=0.05, pad_token_id=3)
    a = bertrt.Model.from_config(cfg, head="pretraining", seed=0)
    b = bertrt.Model.from_config(cfg, head="pretraining", seed=0)
    c = bertrt.Model.from_config(cfg, head="pretraining", seed=1)
    assert list(a.weights) == list(b.weights)
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), f"{name}: seed 0 not reproducible"
    random = [n for n in a.weights if n.endswith("weight") and "LayerNorm" not in n]
    assert random
    for name in random:
        assert not torch.equal(a.weights[name], c.weights[name]), f"{name}: same for seeds 0/1"
    for name, t in a.weights.items():
        if "LayerNorm" in name:
            expected = torch.ones_like(t) if name.endswith("weight") else torch.zeros_like(t)
            assert torch.equal(t, expected), f"{name}: LayerNorm not 1/0"
        elif name.endswith("bias"):
            assert torch.equal(t, torch.zeros_like(t)), f"{name}: bias not 0"
        else:
            values = t
            if name.endswith("word_embeddings.weight"):
                assert torch.equal(t[3], torch.zeros(64)), "[PAD] row not zero"
                values = torch.cat([t[:3], t[4:]])
            std, mean = values.std().item(), values.mean().item()
            # >= 128 samples: a 25% band on the std and 4 standard errors on the mean
            assert abs(std - 0.05) < 0.25 * 0.05, f"{name}: std {std:.4f}, expected 0.05"
            assert abs(mean) < 4 * 0.05 / values.numel() ** 0.5, f"{name}: mean {mean:.4f}"


def test_fresh_head_on_minilm_warns(minilm_dir: Path) -> None:
    with pytest.warns(UserWarning, match=r"classifier\.weight") as record:
        model = bertrt.load(minilm_dir, head="classification")
    assert any("classifier.bias" in str(w.message) for w in record)
    assert model.head == "classification"
    assert set(model.fresh_params) == {"classifier.weight", "classifier.bias"}
    ref = load_file(str(minilm_dir / "model.safetensors"))
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(model.weights["bert." + name], ref[name]), name


# --------------------------------------------------------------------------- bad dirs
@pytest.fixture
def saved_dir(small_cfg: bertrt.BertConfig, tmp_path: Path) -> Path:
    bertrt.Model.from_config(small_cfg, seed=0).save(tmp_path / "model")
    return tmp_path / "model"


def test_missing_config_json(saved_dir: Path) -> None:
    (saved_dir / "config.json").unlink()
    with pytest.raises(bertrt.BertrtError) as exc:
        bertrt.load(saved_dir)
    assert isinstance(exc.value, bertrt.ConfigError)
    one_line(exc, "config.json")


def test_tensor_of_wrong_shape(saved_dir: Path) -> None:
    path = saved_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = "encoder.layer.1.attention.self.key.weight"
    tensors[name] = torch.zeros(32, 33)
    save_file(tensors, str(path))
    with pytest.raises(bertrt.WeightsError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, name, "[32, 33]", "[32, 32]")


def test_tensor_of_integer_dtype(saved_dir: Path) -> None:
    path = saved_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = "encoder.layer.0.output.LayerNorm.bias"
    tensors[name] = torch.zeros(32, dtype=torch.int64)
    save_file(tensors, str(path))
    with pytest.raises(bertrt.WeightsError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, name)


def test_truncated_safetensors(saved_dir: Path) -> None:
    path = saved_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(bertrt.WeightsError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, "model.safetensors")


def test_vocab_larger_than_vocab_size(saved_dir: Path) -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    (saved_dir / "vocab.txt").write_text("\n".join(tokens) + "\n")
    with pytest.raises(bertrt.BertrtError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, "vocab.txt", "vocab_size=50")


def test_unknown_hidden_act(saved_dir: Path) -> None:
    path = saved_dir / "config.json"
    config = json.loads(path.read_text())
    config["hidden_act"] = "gelu_erf_fast"
    path.write_text(json.dumps(config))
    with pytest.raises(bertrt.ConfigError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, "config.json", "hidden_act", "gelu_erf_fast")


def test_missing_encoder_tensor(saved_dir: Path) -> None:
    path = saved_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["encoder.layer.0.intermediate.dense.weight"]
    save_file(tensors, str(path))
    with pytest.raises(bertrt.WeightsError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, "encoder.layer.0.intermediate.dense.weight")


def test_no_weights_file(saved_dir: Path) -> None:
    (saved_dir / "model.safetensors").unlink()
    with pytest.raises(bertrt.WeightsError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, "model.safetensors")


def test_garbage_pytorch_model_bin(saved_dir: Path) -> None:
    (saved_dir / "model.safetensors").unlink()
    (saved_dir / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(bertrt.WeightsError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, "pytorch_model.bin")


def test_invalid_json_config(saved_dir: Path) -> None:
    (saved_dir / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(bertrt.ConfigError) as exc:
        bertrt.load(saved_dir)
    one_line(exc, "config.json")
