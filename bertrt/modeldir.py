"""The files of a model dir that bertrt does not write, carried from the dir a model is loaded
from to every dir it is saved to.

A model dir holds more than bertrt's four files (`config.json`, `model.safetensors`,
`vocab.txt`, `tokenizer_config.json`): a sentence-transformers model has `modules.json`,
`sentence_bert_config.json`, `config_sentence_transformers.json` and its module folders
(`1_Pooling/`, `2_Normalize/`, ...); most have `special_tokens_map.json`, `tokenizer.json`, a
`README.md`. Without them a saved copy is another model elsewhere (sentence-transformers would
pool without normalising). `bertrt.load` reads them (`read_carried`) and `Model.save` writes
them back (`write_carried`), each file atomically with the mode a plain `open()` gives.

Not carried: bertrt's own files; hidden entries (`.git`, `.gitattributes`); what is derived
from the weights and would be stale once they change (other weight formats and shards, ONNX
and OpenVINO exports); the record of a training run kept beside a checkpoint
(`training_state.pt`, `metrics.jsonl`, ...); and `tokenizer.json` when the model's vocabulary
(or lower-casing) is no longer the one it was loaded with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bertrt.errors import WeightsError
from bertrt.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from bertrt.tokenizer import Tokenizer

#: What `Model.save` writes itself.
OWNED = frozenset({"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"})
TOKENIZER_JSON = "tokenizer.json"
#: Top-level files and folders derived from the weights: stale in a copy with new weights.
STALE_NAMES = frozenset({"pytorch_model.bin", "pytorch_model.bin.index.json",
                         "model.safetensors.index.json", "tf_model.h5", "flax_model.msgpack",
                         "rust_model.ot", "onnx", "openvino"})
STALE_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".onnx.data",
                  ".onnx_data")
#: What `bertrt train` keeps beside a model dir (a checkpoint's state, OUT's record of the run,
#: `best/`'s eval.json): about a run, not part of the model.
RUN_RECORDS = frozenset({"training_state.pt", "metrics.jsonl", "run.json", "loss.png",
                         "eval.json", "checkpoints", "best", "data"})


@dataclass(frozen=True)
class Carried:
    """The files of a source dir to write beside a saved model, by relative path, and the
    tokenizer settings its `tokenizer.json` describes."""

    source: Path
    files: dict[str, bytes]
    vocab: dict[str, int] | None
    lowercase: bool | None

    def describes(self, tokenizer: Tokenizer | None) -> bool:
        """Whether the source's `tokenizer.json` is still `tokenizer`'s."""
        return (tokenizer is not None and tokenizer.vocab == self.vocab
                and tokenizer.lowercase == self.lowercase)


def is_carried(name: str) -> bool:
    """Whether a top-level entry of a model dir is carried (see the module docstring)."""
    return not (name in OWNED or name in STALE_NAMES or name in RUN_RECORDS
                or name.startswith(".") or name.endswith(STALE_SUFFIXES))


def read_carried(model_dir: Path, tokenizer: Tokenizer | None) -> Carried:
    """The files of `model_dir` that bertrt does not write, read now (the source may be gone,
    or be the target itself, when the model is saved); `tokenizer` is the one loaded from it.

    Raises:
        WeightsError: a file that cannot be read.
    """
    model_dir = Path(model_dir)
    files: dict[str, bytes] = {}
    for entry in sorted(model_dir.iterdir()):
        if not is_carried(entry.name):
            continue
        paths = [entry] if entry.is_file() else sorted(
            p for p in entry.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(model_dir).parts))
        for path in paths:
            try:
                files[path.relative_to(model_dir).as_posix()] = path.read_bytes()
            except OSError as exc:
                raise WeightsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return Carried(model_dir, files, None if tokenizer is None else tokenizer.vocab,
                   None if tokenizer is None else tokenizer.lowercase)


def write_carried(carried: Carried | None, model_dir: Path,
                  tokenizer: Tokenizer | None) -> list[str]:
    """Write `carried`'s files into `model_dir` (`tokenizer.json` only while it describes
    `tokenizer`); a `tokenizer.json` there that does not describe the saved tokenizer is
    removed (transformers would read it before vocab.txt). Returns the paths written."""
    model_dir = Path(model_dir)
    written = []
    for name, data in (carried.files if carried is not None else {}).items():
        if name == TOKENIZER_JSON and not carried.describes(tokenizer):  # type: ignore[union-attr]
            continue
        atomic_write_bytes(model_dir / name, data)
        written.append(name)
    stale = model_dir / TOKENIZER_JSON
    if tokenizer is not None and TOKENIZER_JSON not in written and stale.is_file():
        os.unlink(stale)
    return written
