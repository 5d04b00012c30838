"""bertrt: a BERT runtime built like a small compiler.

One IR graph (`bertrt.graph`), lowered to PyTorch for training and to ONNX for inference,
sharing one tokenizer and the Hugging Face weight layout.
"""

from bertrt.config import BertConfig
from bertrt.errors import BertrtError, ConfigError, InputError, WeightsError
from bertrt.model import Model, load
from bertrt.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "BertConfig", "BertrtError", "ConfigError", "InputError", "Model", "Tokenizer",
    "WeightsError", "__version__", "load",
]
