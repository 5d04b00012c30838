"""How a model dir says its embeddings are made: the sentence-transformers configuration.

A sentence-transformers model dir (such as all-MiniLM-L6-v2) lists its pipeline in
`modules.json`: a Transformer (the BERT encoder), a Pooling module (`1_Pooling/config.json`:
mean, cls or max over the real tokens), and optionally a Normalize module (L2). Its
`sentence_bert_config.json` gives `max_seq_length`, the truncation length it encodes with.
`embedding_defaults(dir)` reads them into `EmbeddingDefaults`; a dir without `modules.json`
gets the plain default: the `[CLS]` token's final hidden state (not the pooler output),
unnormalized, at the model's own maximum length.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertrt.errors import BertrtError
from bertrt.serve.outputs import POOLINGS

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"

#: Legacy boolean keys of a Pooling config, in the order sentence-transformers concatenates
#: them, and the mode each stands for.
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean",
                 "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class EmbeddingDefaults:
    """What `embed` does when the caller does not say."""

    #: One of `POOLINGS`.
    pooling: str = "cls"
    normalize: bool = False
    #: Truncation length (sentence-transformers' `max_seq_length`); None: the model's own.
    max_length: int | None = None
    #: Where the defaults came from, for messages.
    source: str = "bertrt's default ([CLS] hidden state)"
    #: Why the dir's sentence-transformers pipeline cannot be reproduced (a module bertrt
    #: does not run); `embed` refuses the defaults then, and says this.
    unsupported: str | None = None


def embedding_defaults(model_dir: str | os.PathLike[str] | None) -> EmbeddingDefaults:
    """The embedding defaults of a model dir (see the module docstring).

    Raises:
        BertrtError: `modules.json` or a module config is not readable JSON of the expected
            shape.
    """
    if model_dir is None or not (Path(model_dir) / MODULES_FILE).is_file():
        return EmbeddingDefaults()
    root = Path(model_dir)
    modules = _read_json(root / MODULES_FILE, list)
    if not all(isinstance(m, dict) for m in modules):
        raise BertrtError(f"{root / MODULES_FILE}: expected a JSON list of modules")
    source = f"sentence-transformers config of {root}"
    pooling, normalize, max_length, unsupported = "cls", False, None, []
    seen_pooling = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", ""))
        name = kind.rpartition(".")[2]  # sentence_transformers.models.Pooling, or newer paths
        path = root / str(module.get("path", ""))
        if name == "Transformer":
            config = _read_json(path / TRANSFORMER_CONFIG) if (
                path / TRANSFORMER_CONFIG).is_file() else {}
            if isinstance(config, dict) and isinstance(config.get("max_seq_length"), int):
                max_length = config["max_seq_length"]
        elif name == "Pooling":
            mode = _pooling_mode(_read_json(path / "config.json", dict))
            if mode in POOLINGS:
                pooling, seen_pooling = mode, True
            else:
                unsupported.append(f"pooling {mode}")
        elif name == "Normalize":
            normalize = True
        else:
            unsupported.append(f"module {kind}")
    if not seen_pooling and not unsupported:
        unsupported.append("no Pooling module")
    why = None
    if unsupported:
        why = (f"{root / MODULES_FILE} asks for {', '.join(unsupported)}, which bertrt does not "
               f"run (it pools {', '.join(POOLINGS)}); give pooling= (and normalize=) yourself")
    return EmbeddingDefaults(pooling, normalize, max_length, source, why)


def _pooling_mode(config: dict[str, Any]) -> str:
    """The one pooling mode of a Pooling config (`pooling_mode`, or the legacy booleans, which
    default to mean); several modes (concatenated by sentence-transformers) as `a+b`."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_MODES.items() if config.get(key)] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else [str(m) for m in mode]
    return "+".join(modes)


def _read_json(path: Path, kind: type = object) -> Any:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BertrtError(f"{path}: no such file (named by {MODULES_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BertrtError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, kind):
        raise BertrtError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}")
    return value
