"""The CLI through click's CliRunner: output that reflects the model, one-line errors, exit 2."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from bertrt.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _total_flops(output: str) -> str:
    return [ln for ln in output.splitlines() if ln.startswith("total")][0].split()[-2]


def test_inspect_preset_prints_the_table_and_writes_dot(tmp_path):
    dot = tmp_path / "g.dot"
    result = run("inspect", "--preset", "base", "--seq", "128", "--dot", str(dot))
    assert result.exit_code == 0, result.output
    assert "layers=12 hidden=768 heads=12" in result.output
    assert _total_flops(result.output) == "22.35G"  # analytic: tests/graph/test_inspect.py
    assert dot.read_text().startswith('digraph "bert-none"')
    fused = run("inspect", "--preset", "tiny", "--fused")
    assert "ATTENTION 2" in fused.output and "SKIP_LAYER_NORM 4" in fused.output


def test_inspect_model_dir(minilm_dir):
    result = run("inspect", str(minilm_dir), "--batch", "2", "--seq", "16")
    assert result.exit_code == 0, result.output
    assert "layers=6 hidden=384 heads=12" in result.output
    assert re.search(r"total\s+\d+ nodes\s+22,713,216", result.output)


@pytest.mark.parametrize("setup,args,message", [
    (None, ["inspect", "{tmp}/missing"], "not a directory"),
    ("empty", ["inspect", "{tmp}"], "config.json: file not found"),
    ("badact", ["inspect", "{tmp}"], "hidden_act 'mish' is not supported"),
    (None, ["inspect", "--preset", "tiny", "--seq", "9999"], "exceeds max_position_embeddings"),
    (None, ["inspect", "--preset", "tiny", "--dot", "{tmp}/no/such/dir/g.dot"],
     "does not exist"),
    (None, ["vocab", "{tmp}/missing.txt", "-o", "{tmp}/v.txt"], "missing.txt"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, setup, args, message):
    if setup == "badact":
        (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "mish"}))
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_vocab_trains_a_wordpiece_vocab(tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = ["runtime", "tokenizer", "attention", "embedding", "gradient", "layer"]
    corpus.write_text("\n".join(" ".join(words[(i + j) % 6] for j in range(8))
                                for i in range(200)))
    out = tmp_path / "vocab.txt"
    result = run("vocab", str(corpus), "-o", str(out), "--size", "120")
    assert result.exit_code == 0, result.output
    tokens = out.read_text().splitlines()
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "attention" in tokens and len(tokens) <= 120
