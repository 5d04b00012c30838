"""`BertConfig`: the keys of a Hugging Face BERT `config.json`, validated.

Keys bertrt does not use (`architectures`, `_name_or_path`, `use_cache`, `id2label`, ...) are
kept in `extra` and written back unchanged, so a config survives a load/save round trip.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertrt.errors import ConfigError
from bertrt.fileio import atomic_write_text

#: hidden_act values and what they compute. The tanh forms are one function written three ways.
ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu",  # exact, erf form
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16),
}

_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


@dataclass
class BertConfig:
    """The architecture of a BERT model, as in a Hugging Face `config.json`.

    Args:
        vocab_size: Number of wordpieces in the vocabulary.
        hidden_size: Width H of every layer.
        num_hidden_layers: Number of encoder layers L.
        num_attention_heads: Number of attention heads N; H must be divisible by N.
        intermediate_size: Width of the feed-forward layer (4H in the reference recipe).
        hidden_act: Feed-forward activation, one of `ACTIVATIONS`.
        hidden_dropout_prob: Dropout on embeddings and sub-layer outputs (training only).
        attention_probs_dropout_prob: Dropout on attention probabilities (training only).
        max_position_embeddings: Longest sequence the position table covers.
        type_vocab_size: Number of segment (token type) ids.
        initializer_range: Standard deviation of the normal initialisation.
        layer_norm_eps: Epsilon of every LayerNorm.
        pad_token_id: Id of `[PAD]`.
        num_labels: Classes of a classification head (from `id2label` when present).
        extra: Keys bertrt does not use, kept and written back.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "BertConfig") -> None:
        """Raise `ConfigError` naming the first invalid field."""
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{source}: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"{source}: hidden_act {self.hidden_act!r} is not supported; "
                f"expected one of {', '.join(sorted(ACTIVATIONS))}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{source}: {name} must be in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ConfigError(f"{source}: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ConfigError(
                f"{source}: initializer_range must be >= 0, got {self.initializer_range!r}"
            )
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"{source}: pad_token_id must be in [0, vocab_size={self.vocab_size}), "
                f"got {self.pad_token_id!r}"
            )
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or (
            self.num_labels <= 0
        ):
            raise ConfigError(f"{source}: num_labels must be a positive integer")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        """Width D = H / N of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def activation(self) -> str:
        """The canonical activation computed for `hidden_act` (gelu, gelu_tanh, relu, silu)."""
        return ACTIVATIONS[self.hidden_act]

    @property
    def id2label(self) -> dict[int, str]:
        """Class names of a classification head (`LABEL_i` when the config has none)."""
        raw = self.extra.get("id2label")
        if raw:
            return {int(k): str(v) for k, v in raw.items()}
        return {i: f"LABEL_{i}" for i in range(self.num_labels)}

    def with_labels(self, labels: list[str]) -> BertConfig:
        """A copy whose classification head predicts `labels` (sets id2label/label2id)."""
        extra = dict(self.extra)
        extra["id2label"] = {str(i): name for i, name in enumerate(labels)}
        extra["label2id"] = {name: i for i, name in enumerate(labels)}
        return dataclasses.replace(self, num_labels=len(labels), extra=extra)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BertConfig:
        """A named size: tiny, mini, small, base or large (intermediate 4H, BERT defaults)."""
        if name not in PRESETS:
            raise ConfigError(f"preset {name!r} is unknown; expected one of {', '.join(PRESETS)}")
        sizes = dict(PRESETS[name])
        sizes["intermediate_size"] = 4 * sizes["hidden_size"]
        sizes.update(overrides)
        return cls(**sizes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> BertConfig:
        """Build from a `config.json` mapping; unknown keys land in `extra`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'bert'")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "num_labels"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "id2label" in data and isinstance(data["id2label"], dict):
            kwargs["num_labels"] = len(data["id2label"])
        elif "num_labels" in data:
            kwargs["num_labels"] = data["num_labels"]
        extra.pop("num_labels", None)
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else (
                f.default
            )
            setattr(config, f.name, kwargs.get(f.name, default))
        config.extra = extra
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> BertConfig:
        """Load a `config.json` file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found (expected a BERT config.json)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> BertConfig:
        """Load `config.json` from a Hugging Face-layout model directory."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"{model_dir}: not a directory (expected a model dir)")
        return cls.from_json(model_dir / "config.json")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The `config.json` mapping, unknown keys included."""
        data: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "num_labels"):
                data[f.name] = getattr(self, f.name)
        data["model_type"] = "bert"
        if "id2label" not in data:
            data["id2label"] = {str(i): name for i, name in self.id2label.items()}
            data["label2id"] = {name: i for i, name in self.id2label.items()}
        return dict(sorted(data.items()))

    def save(self, model_dir: str | os.PathLike[str]) -> Path:
        """Write `config.json` into `model_dir` atomically; returns its path."""
        path = Path(model_dir) / "config.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

