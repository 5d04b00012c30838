"""`bertrt train --model DIR` carries DIR's files that bertrt does not write (sentence-
transformers configs and modules, tokenizer.json while the vocabulary is DIR's) into its
checkpoints and OUT, and leaves out what the new weights make stale."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from bertrt.tokenizer import SPECIAL_TOKENS
from bertrt.train.cli import train


def test_train_carries_the_model_dirs_files(word_tokenizer, save_model,
                                            tmp_path: Path) -> None:
    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{w} and {w}\t{w}\n" for w in ("red", "blue")))
    source = save_model(word_tokenizer(data), tmp_path / "source", head="none")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    (source / "modules.json").write_text("[]\n")
    (source / "tokenizer.json").write_text("{}\n")  # describes source's vocabulary
    (source / "pytorch_model.bin").write_bytes(b"stale weights")
    (source / "onnx").mkdir()
    (source / "onnx" / "model.onnx").write_bytes(b"a stale export")
    args = ["--task", "classify", "--data", str(data), "--model", str(source), "--max-steps",
            "2", "--batch-size", "2", "--seq-len", "8", "--threads", "1"]
    out = tmp_path / "out"
    result = CliRunner().invoke(train, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    for folder in (out, out / "checkpoints" / "step-2"):
        assert (folder / "1_Pooling" / "config.json").is_file()
        assert (folder / "modules.json").read_text() == "[]\n"
        assert (folder / "tokenizer.json").read_text() == "{}\n"
        assert not (folder / "pytorch_model.bin").exists() and not (folder / "onnx").exists()
    assert not (out / "checkpoints" / "step-2" / "checkpoints").exists()

    vocab = tmp_path / "vocab.txt"  # another vocabulary: the source's tokenizer.json is stale
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "red", "blue", "and", "green"]) + "\n")
    result = CliRunner().invoke(train, [*args, "--vocab", str(vocab), "--out",
                                        str(tmp_path / "out2")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out2" / "modules.json").is_file()
    assert not (tmp_path / "out2" / "tokenizer.json").exists()
    assert os.listdir(tmp_path / "out2" / "1_Pooling") == ["config.json"]
