"""bertrt: a BERT runtime built like a small compiler.

One IR graph (`bertrt.graph`), lowered to PyTorch for training and to ONNX for inference,
sharing one tokenizer and the Hugging Face weight layout.

`Model`, `load`, `Tokenizer` and `InferenceEngine` are imported on first use, so the layers
that must stay free of torch (the IR, the ONNX lowering) can import `bertrt.errors` without
loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bertrt.config import BertConfig
from bertrt.errors import BertrtError, ConfigError, InputError, WeightsError

if TYPE_CHECKING:
    from bertrt.model import Model, load
    from bertrt.serve.engine import InferenceEngine
    from bertrt.tokenizer import Tokenizer

__version__ = "0.1.0"

_LAZY = {"Model": "bertrt.model", "load": "bertrt.model", "Tokenizer": "bertrt.tokenizer",
         "InferenceEngine": "bertrt.serve.engine"}

__all__ = [
    "BertConfig", "BertrtError", "ConfigError", "InferenceEngine", "InputError", "Model",
    "Tokenizer", "WeightsError", "__version__", "load",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bertrt' has no attribute {name!r}")
