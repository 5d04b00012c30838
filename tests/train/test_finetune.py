"""Fine-tuning: a small synthetic but order-sensitive classification task learned to > 90%
eval accuracy with the best checkpoint kept; token tagging with entity F1; continuing from a
checkpoint without the task's head (MiniLM included) initialises the head with a notice."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

import bertrt
from bertrt.train.cli import train

FILLER = ("the a of to and in on with for from by at some many few old new small large red "
          "blue green quiet loud fast slow").split()
SET_A = ["apple", "pear", "plum", "grape"]
SET_B = ["stone", "brick", "sand", "clay"]


def keyword_order_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Label = which keyword set comes first: `a_first` or `b_first`. Both sets appear in every
    text, so no single word decides the label: the model must attend to order."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
        i, j = sorted(rng.sample(range(len(words) + 2), 2))
        first, second = (SET_A, SET_B) if rng.random() < 0.5 else (SET_B, SET_A)
        words.insert(i, rng.choice(first))
        words.insert(j, rng.choice(second))
        rows.append((" ".join(words), "a_first" if first is SET_A else "b_first"))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def world(word_tokenizer, save_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    train_csv = write_csv(root / "train.csv", keyword_order_rows(800, seed=0))
    eval_csv = write_csv(root / "eval.csv", keyword_order_rows(200, seed=1))
    text = root / "words.txt"
    text.write_text(" ".join(FILLER + SET_A + SET_B) + "\n")
    save_model(word_tokenizer(text), root / "model", hidden=64, heads=4, max_positions=32,
               dropout=0.0)
    return {"root": root, "train": train_csv, "eval": eval_csv, "model": root / "model"}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_classification_reaches_90_percent_and_keeps_the_best(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(train, [
        "--task", "classify", "--data", str(world["train"]), "--eval-data", str(world["eval"]),
        "--model", str(world["model"]), "--out", str(out), "--batch-size", "32",
        "--seq-len", "24", "--max-steps", "300", "--lr", "2e-3", "--warmup", "0.1",
        "--log-every", "50", "--save-every", "100", "--eval-every", "50", "--threads", "1"])
    assert result.exit_code == 0, result.output
    # the pretraining checkpoint had no classifier: a notice names the fresh parameters
    assert "classifier.weight" in result.output and "initialised fresh" in result.output
    evals = [r for r in rows(out) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [50, 100, 150, 200, 250, 300]
    best = max(r["eval_macro_f1"] for r in evals)
    print("eval accuracy by step:", [(r["step"], round(r["eval_accuracy"], 3)) for r in evals])
    assert max(r["eval_accuracy"] for r in evals) > 0.9
    # the best checkpoint by eval macro-F1 is kept in OUT/best, and said so
    kept = json.loads((out / "best" / "eval.json").read_text())
    assert kept["macro_f1"] == best
    assert f"best checkpoint by eval macro_f1 ({best:.4f}): {out / 'best'}" in result.output
    final = bertrt.load(out)
    assert final.head == "classification"
    assert final.config.id2label == {0: "a_first", 1: "b_first"}
    assert bertrt.load(out / "best").config.id2label == final.config.id2label


def test_tagging_reports_entity_f1(word_tokenizer, save_model, tmp_path: Path) -> None:
    rng = random.Random(0)
    people, cities = ["anna", "omar", "li", "sara"], ["paris", "lima", "oslo", "rome"]
    other = "went to visit met saw in the and from".split()

    def sentence() -> list[tuple[str, str]]:
        out = [(rng.choice(other), "O") for _ in range(rng.randint(2, 6))]
        out.insert(rng.randint(0, len(out)), (rng.choice(people), "B-PER"))
        out.insert(rng.randint(0, len(out)), (rng.choice(cities), "B-LOC"))
        return out

    def conll(path: Path, n: int) -> Path:
        path.write_text("-DOCSTART- O\n\n" + "\n\n".join(
            "\n".join(f"{w} {t}" for w, t in sentence()) for _ in range(n)) + "\n")
        return path

    words = tmp_path / "words.txt"
    words.write_text(" ".join(people + cities + other) + "\n")
    save_model(word_tokenizer(words), tmp_path / "m", layers=1, max_positions=32, head="none")
    out = tmp_path / "out"
    result = CliRunner().invoke(train, [
        "--task", "tag", "--data", str(conll(tmp_path / "train.conll", 300)),
        "--eval-data", str(conll(tmp_path / "eval.conll", 60)), "--model", str(tmp_path / "m"),
        "--out", str(out), "--batch-size", "16", "--seq-len", "16", "--max-steps", "60",
        "--lr", "3e-3", "--log-every", "20", "--save-every", "30", "--threads", "1"])
    assert result.exit_code == 0, result.output
    last = rows(out)[-1]
    assert {"eval_f1", "eval_precision", "eval_recall", "eval_accuracy"} <= last.keys()
    assert last["eval_f1"] > 0.9
    final = bertrt.load(out)
    assert final.head == "token-classification"
    assert sorted(final.config.id2label.values()) == ["B-LOC", "B-PER", "O"]
    assert (out / "best" / "eval.json").is_file()


def test_continue_from_minilm_initialises_the_missing_heads(minilm_dir: Path,
                                                             tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\nIt was warm.\n\nA dog ran home.\nIt was late.\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(train, [
        "--data", str(corpus), "--model", str(minilm_dir), "--out", str(out),
        "--batch-size", "2", "--seq-len", "16", "--max-steps", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "initialised fresh" in result.output
    for name in ("cls.predictions.transform.dense.weight", "cls.seq_relationship.weight"):
        assert name in result.output
    assert "bert.encoder.layer.0.attention.self.query.weight" not in result.output
    model = bertrt.load(out)
    assert model.head == "pretraining" and model.config.num_hidden_layers == 6
