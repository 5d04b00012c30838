"""Regression (`--task regress`): a synthetic similarity task that needs both texts of a pair
(the score is how near their topics are) learned to eval Pearson >= 0.9; metrics checked against
scipy; the model saved as Hugging Face's one-output regression head, predicted by
`bertrt predict --pairs` (model dir and ONNX export) as transformers does; bad scores in a data
file are one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bertrt.cli import main
from bertrt.train.cli import train
from bertrt.train.tasks import regression_metrics

#: Five topics of five words on a line: the score of a pair falls with the distance between
#: the topics of its two texts, so no word of either text alone decides it.
WORDS = ("alpha beta gamma delta river stone cloud light tree house road city field garden "
         "window door music paper glass water snow wind fire rain sand").split()
TOPICS = [WORDS[i * 5:(i + 1) * 5] for i in range(5)]


def similarity_rows(n: int, seed: int) -> list[tuple[str, str, float]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(5), rng.randrange(5)
        rows.append((" ".join(rng.sample(TOPICS[a], 3)), " ".join(rng.sample(TOPICS[b], 3)),
                     (4 - abs(a - b)) * 1.25))
    return rows


@pytest.fixture(scope="module")
def world(word_tokenizer, save_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("regress")
    train_tsv = root / "train.tsv"
    train_tsv.write_text("text\ttext_pair\tlabel\n" + "".join(
        f"{a}\t{b}\t{s}\n" for a, b, s in similarity_rows(2000, seed=1)))
    held_out = similarity_rows(300, seed=2)
    eval_jsonl = root / "eval.jsonl"  # JSON numbers here, CSV-style text in train.tsv
    eval_jsonl.write_text("".join(json.dumps({"text": a, "text_pair": b, "label": s}) + "\n"
                                  for a, b, s in held_out))
    words = root / "words.txt"
    words.write_text(" ".join(WORDS) + "\n")
    model = save_model(word_tokenizer(words), root / "model", hidden=64, heads=4,
                       max_positions=32, dropout=0.0, head="none")
    out = root / "out"
    result = CliRunner().invoke(train, [
        "--task", "regress", "--data", str(train_tsv), "--eval-data", str(eval_jsonl),
        "--model", str(model), "--batch-size", "32", "--seq-len", "16", "--max-steps", "500",
        "--save-every", "250", "--lr", "1e-3", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"root": root, "out": out, "held_out": held_out, "output": result.output,
            "args": ["--task", "regress", "--model", str(model), "--max-steps", "2",
                     "--seq-len", "16"]}


def test_regression_learns_a_pair_similarity(world) -> None:
    rows = [json.loads(line) for line in
            (world["out"] / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["eval_pearson"] >= 0.9 and final["eval_spearman"] >= 0.9
    assert final["eval_mse"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert f"eval Pearson r {final['eval_pearson']:.3f}" in world["output"]
    assert "pearson" in rows[0] and -1.0 <= rows[0]["pearson"] <= 1.0  # every step's too
    config = json.loads((world["out"] / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "score"}
    assert json.loads((world["out"] / "best" / "eval.json").read_text())["pearson"] >= 0.9


def test_predict_gives_the_score_as_transformers_does(world, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, pairs = tmp_path / "texts.txt", tmp_path / "pairs.txt"
    texts.write_text("".join(a + "\n" for a, _, _ in world["held_out"]))
    pairs.write_text("".join(b + "\n" for _, b, _ in world["held_out"]))
    gold = np.array([s for _, _, s in world["held_out"]])
    onnx = tmp_path / "model.onnx"
    assert CliRunner().invoke(main, ["export", str(onnx), "--model", str(world["out"])]
                              ).exit_code == 0
    scores = {}
    for name, model in (("dir", world["out"]), ("onnx", onnx)):
        vocab = ["--vocab", str(world["out"])] if name == "onnx" else []
        result = CliRunner().invoke(main, ["predict", str(model), "--texts", str(texts),
                                           "--pairs", str(pairs), *vocab,
                                           "-o", str(tmp_path / "p.jsonl")])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
        assert all(set(row) == {"score"} for row in rows)
        scores[name] = np.array([row["score"] for row in rows])
    assert np.corrcoef(scores["dir"], gold)[0, 1] >= 0.9
    assert np.abs(scores["onnx"] - scores["dir"]).max() < 1e-4

    hf = AutoModelForSequenceClassification.from_pretrained(world["out"]).eval()
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(world["out"])
    first = world["held_out"][:16]
    enc = tok([a for a, _, _ in first], [b for _, b, _ in first], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        reference = hf(**enc).logits[:, 0].numpy()
    assert np.abs(reference - scores["dir"][:16]).max() < 1e-4


def test_regression_metrics_match_scipy() -> None:
    from scipy import stats

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 6, 200).astype(float)  # many ties, as STS-B's scores have
    pred = gold + rng.normal(0, 1.5, 200)
    pred[:20] = np.round(pred[:20])  # ties among the predictions too
    got = regression_metrics(pred, gold)
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0], abs=1e-12)
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0], abs=1e-12)
    assert got["mse"] == pytest.approx(np.mean((pred - gold) ** 2))
    assert regression_metrics(np.ones(5), gold[:5])["pearson"] == 0.0  # constant: no r


_GOOD = {".tsv": "text\ttext_pair\tlabel\na\tb\t2.5\n", ".csv": "text,text_pair,label\na,b,2.5\n",
         ".jsonl": '{"text": "a", "text_pair": "b", "label": 2.5}\n'}


@pytest.mark.parametrize(("suffix", "row", "shown"), [
    (".tsv", "a\tb\thigh", "'high'"),
    (".csv", "a,b,", "''"),
    (".tsv", "a\tb\tnan", "'nan'"),
    (".csv", "a,b,-inf", "'-inf'"),
    (".jsonl", '{"text": "a", "text_pair": "b", "label": true}', "True"),
    (".jsonl", '{"text": "a", "text_pair": "b", "label": null}', "None"),
])
def test_bad_scores_are_one_line(world, tmp_path: Path, suffix: str, row: str,
                                 shown: str) -> None:
    data = tmp_path / f"bad{suffix}"
    data.write_text(_GOOD[suffix] + row + "\n")  # the bad row is the file's last line
    line = _GOOD[suffix].count("\n") + 1
    out = tmp_path / "out"
    result = CliRunner().invoke(train, [*world["args"], "--data", str(data), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {data}: line {line}, column 'label': expected a number (the score to "
        f"regress), got {shown}")
    assert not out.exists()
