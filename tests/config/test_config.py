"""BertConfig: HF config.json keys, unknown keys kept, presets, validation naming the field."""

from __future__ import annotations

import json

import pytest

from bertrt import BertConfig, ConfigError


def test_presets_have_the_documented_sizes():
    sizes = {name: (c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                    c.intermediate_size)
             for name in ("tiny", "mini", "small", "base", "large")
             for c in [BertConfig.preset(name)]}
    assert sizes == {"tiny": (2, 128, 2, 512), "mini": (4, 256, 4, 1024),
                     "small": (4, 512, 8, 2048), "base": (12, 768, 12, 3072),
                     "large": (24, 1024, 16, 4096)}
    with pytest.raises(ConfigError, match="preset 'huge'"):
        BertConfig.preset("huge")


def test_round_trip_keeps_unknown_keys(tmp_path):
    data = {"architectures": ["BertModel"], "_name_or_path": "x", "use_cache": True,
            "model_type": "bert", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100,
            "id2label": {"0": "neg", "1": "pos", "2": "neutral"},
            "label2id": {"neg": 0, "pos": 1, "neutral": 2}, "gradient_checkpointing": False}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = BertConfig.from_pretrained(tmp_path)
    assert cfg.hidden_size == 64 and cfg.num_labels == 3
    assert cfg.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    out = tmp_path / "out"
    cfg.save(out)
    back = json.loads((out / "config.json").read_text())
    for key, value in data.items():
        assert back[key] == value, key
    assert BertConfig.from_pretrained(out) == cfg


def test_real_checkpoint_config_loads(minilm_dir):
    cfg = BertConfig.from_pretrained(minilm_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", 100, "hidden_size \\(100\\) must be divisible by num_attention_heads"),
    ("hidden_act", "mish", "hidden_act 'mish' is not supported"),
    ("vocab_size", 0, "vocab_size must be a positive integer"),
    ("num_hidden_layers", -1, "num_hidden_layers must be a positive integer"),
    ("hidden_dropout_prob", 1.5, "hidden_dropout_prob must be in"),
    ("layer_norm_eps", 0.0, "layer_norm_eps must be > 0"),
    ("intermediate_size", "big", "intermediate_size must be a positive integer"),
])
def test_validation_names_the_field(tmp_path, field, value, message):
    data = {"hidden_size": 64, "num_attention_heads": 8, field: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as info:
        BertConfig.from_json(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: file not found"):
        BertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        BertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="model_type is 'gpt2'"):
        BertConfig.from_pretrained(tmp_path)
