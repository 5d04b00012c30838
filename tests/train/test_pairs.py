"""Pair matching (paraphrase detection): `text_pair` reaches the classifier; a two-class task
reports the positive class's precision, recall and F1 beside accuracy (checked against
scikit-learn), and `bertrt predict --pairs` labels pairs as the training evaluation did; the
example file of docs/training.md reads as a pair task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bertrt.cli import main
from bertrt.tokenizer import Tokenizer
from bertrt.train.cli import train
from bertrt.train.tasks import classification_metrics, classification_source

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("alpha beta gamma delta river stone cloud light tree house road city field garden "
         "window door music paper glass water").split()
TOPICS = [WORDS[i * 5:(i + 1) * 5] for i in range(4)]


def matching_rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """A pair matches (label 1) when its two texts share a topic; about a third do, and one
    label in twenty is flipped (so no model scores 100%)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.randrange(4)
        b = a if rng.random() < 0.35 else rng.choice([t for t in range(4) if t != a])
        match = (a == b) != (rng.random() < 0.05)
        rows.append((" ".join(rng.sample(TOPICS[a], 3)), " ".join(rng.sample(TOPICS[b], 3)),
                     "1" if match else "0"))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("text\ttext_pair\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(word_tokenizer, save_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pairs")
    data = write_tsv(root / "train.tsv", matching_rows(1200, seed=1))
    held_out = matching_rows(300, seed=2)
    eval_tsv = write_tsv(root / "eval.tsv", held_out)
    words = root / "words.txt"
    words.write_text(" ".join(WORDS) + "\n")
    model = save_model(word_tokenizer(words), root / "model", hidden=64, heads=4,
                       max_positions=32, dropout=0.0, head="none")
    out = root / "out"
    result = CliRunner().invoke(train, [
        "--task", "classify", "--data", str(data), "--eval-data", str(eval_tsv), "--model",
        str(model), "--batch-size", "32", "--seq-len", "16", "--max-steps", "400",
        "--save-every", "200", "--lr", "1e-3", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"out": out, "held_out": held_out, "output": result.output}


def test_a_pair_task_reports_the_positive_class_f1(world) -> None:
    rows = [json.loads(line) for line in
            (world["out"] / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert 0.85 <= final["eval_f1"] < 1.0 and final["eval_accuracy"] >= 0.85
    assert {"eval_precision", "eval_recall", "eval_macro_f1"} <= set(final)
    assert "f1" not in rows[0]  # a step reports accuracy; F1 is the evaluation's
    assert f"eval acc {final['eval_accuracy']:.1%}, eval F1 {final['eval_f1']:.1%}" in (
        world["output"])


def test_predict_pairs_labels_as_the_evaluation_did(world, tmp_path: Path) -> None:
    texts, pairs = tmp_path / "texts.txt", tmp_path / "pairs.txt"
    texts.write_text("".join(a + "\n" for a, _, _ in world["held_out"]))
    pairs.write_text("".join(b + "\n" for _, b, _ in world["held_out"]))
    result = CliRunner().invoke(main, ["predict", str(world["out"]), "--texts", str(texts),
                                       "--pairs", str(pairs), "-o", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    predicted = [json.loads(line)["label"] for line in
                 (tmp_path / "p.jsonl").read_text().splitlines()]
    gold = np.array([label == "1" for _, _, label in world["held_out"]])
    hits = np.array([p == "1" for p in predicted])
    f1 = 2 * (hits & gold).sum() / (hits.sum() + gold.sum())
    final = json.loads((world["out"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert f1 == pytest.approx(final["eval_f1"], abs=1e-9)  # the same pairs, the same model


def test_positive_class_scores_match_scikit_learn() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 300)
    pred = np.where(rng.random(300) < 0.8, gold, 1 - gold)
    got = classification_metrics(pred, gold, num_labels=2)
    p, r, f, _ = precision_recall_fscore_support(gold, pred, average="binary", pos_label=1)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f), abs=1e-12)
    none = classification_metrics(np.zeros(4, int), np.zeros(4, int), num_labels=2)
    assert none["f1"] == none["precision"] == none["recall"] == 0.0  # no positive at all
    assert "f1" not in classification_metrics(pred % 3, gold, num_labels=3)


def test_the_documented_example_file_is_a_pair_task(minilm_dir: Path) -> None:
    path = ROOT / "docs" / "examples" / "pairs.tsv"
    source, labels, cut = classification_source(path, Tokenizer.from_dir(minilm_dir), 64, 0,
                                                shuffle=False)
    assert labels == ["0", "1"] and len(source) == 20 and cut == 0
    first = source[0]
    assert first.label == 1 and 1 in first.token_type_ids  # the second text is segment 1
    assert "docs/examples/pairs.tsv" in (ROOT / "docs" / "training.md").read_text()
