"""`--task qa`: SQuAD files read and checked, answers mapped to window tokens, the official
metrics, and a fine-tune from MiniLM on a synthetic SQuAD v2.0 set that reaches F1 >= 80 on its
held-out split; `bertrt eval` scores the trained model as training did.

The synthetic set: paragraphs of 3 or 4 facts of distinct kinds (of five) about made-up names,
shuffled among filler sentences, so answers sit anywhere and many contexts span several
windows; three questions per paragraph, and in 40% of them a question of a kind the paragraph
has no fact of (v2.0 `is_impossible`). Train and held-out sets share no name. The model is
MiniLM with its vocabulary cut to the pieces the set uses (their embedding rows kept, so each
text tokenizes as with the full vocabulary), which keeps the embedding table's gradient and
optimizer step small; the fine-tune is 60 steps of 16 windows of 64 tokens.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import bertrt
from bertrt.cli import main
from bertrt.model import Model
from bertrt.serve import qa
from bertrt.tokenizer import SPECIAL_TOKENS, Tokenizer
from bertrt.train import squad
from bertrt.train.config import TrainConfig
from bertrt.train.corpus import DataError

SYLLABLES = ["ka", "lo", "mir", "ten", "va", "dor", "bel", "is", "ur", "nax", "po", "shi", "ren",
             "gal", "tu", "fen", "or", "zel"]
FIRST = ["Anna", "Boris", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hilde", "Ivo", "Jana",
         "Kofi", "Lena", "Marek", "Nadia", "Oskar", "Priya"]
NOUNS = ["harbor", "garden", "mirror", "lantern", "orchard", "bridge", "winter", "letter"]
ADJECTIVES = ["silent", "golden", "broken", "hidden", "last", "northern", "quiet", "burning"]
FILLER = ["The weather there changes quickly in spring.", "Old maps show a different coastline.",
          "Many travellers stop there on their way south.", "Markets open early in the morning.",
          "The region is known for its long festivals."]


def _fact(rng: random.Random, kind: int) -> tuple[str, str, str]:
    """(sentence, question, answer) of one made-up fact of one of five kinds."""
    def name(n: int = 2) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()

    if kind == 0:
        e, a = name(3), name() + "port"
        return f"The capital of {e} is {a}.", f"What is the capital of {e}?", a
    if kind == 1:
        e, a = f"{rng.choice(FIRST)} {name()}", str(rng.randint(1700, 2010))
        return f"{e} was born in {a}.", f"When was {e} born?", a
    if kind == 2:
        e = f"{rng.choice(FIRST)} {name()}"
        a = f"The {rng.choice(ADJECTIVES).capitalize()} {rng.choice(NOUNS).capitalize()}"
        return f"{e} wrote the novel {a}.", f"Which novel did {e} write?", a
    if kind == 3:
        e, a = name(3), name()
        return f"The {a} river flows through {e}.", f"Which river flows through {e}?", a
    e, a = name(3), f"{rng.randint(2, 99)},{rng.randint(100, 999)}"
    return f"{e} has a population of {a} people.", f"How many people live in {e}?", a


def make_squad(seed: int, paragraphs: int, impossible: float = 0.4) -> dict:
    """A SQuAD v2.0 set of `paragraphs` synthetic paragraphs (see the module doc)."""
    rng = random.Random(seed)
    out, qid = [], 0
    for _ in range(paragraphs):
        kinds = rng.sample(range(5), rng.randint(3, 4))
        facts = [_fact(rng, kind) for kind in kinds]
        parts = [f[0] for f in facts] + rng.sample(FILLER, rng.randint(1, 4))
        rng.shuffle(parts)
        context = " ".join(parts)
        qas = []
        for sentence, question, answer in rng.sample(facts, 3):
            start = context.index(sentence) + sentence.index(answer)
            qas.append({"id": f"q{seed}-{qid}", "question": question, "is_impossible": False,
                        "answers": [{"text": answer, "answer_start": start}]})
            qid += 1
        if rng.random() < impossible:  # about a kind of fact the paragraph lacks
            absent = rng.choice([k for k in range(5) if k not in kinds])
            qas.append({"id": f"q{seed}-{qid}", "question": _fact(rng, absent)[1],
                        "answers": [], "is_impossible": True})
            qid += 1
        out.append({"context": context, "qas": qas})
    return {"version": "v2.0", "data": [{"title": "synthetic", "paragraphs": out}]}


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("squad")
    paths = {}
    for name, seed, n in (("train", 1, 110), ("dev", 2, 30)):
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(make_squad(seed, n)))
    return paths


@pytest.fixture(scope="module")
def small_minilm(minilm_dir, squad_files, tmp_path_factory):
    """MiniLM, its vocabulary cut to the pieces of the SQuAD files."""
    full = bertrt.load(minilm_dir)
    texts = [t for p in squad_files.values() for t in squad.squad_texts(p)]
    used = {i for ids in full.tokenizer(texts, padding=False)["input_ids"] for i in ids}
    used |= {full.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    rows = sorted(used)
    tokenizer = Tokenizer([full.tokenizer.id_to_token(i) for i in rows])
    config = dataclasses.replace(full.config, vocab_size=len(rows))
    small = Model.from_config(config, tokenizer=tokenizer)
    for name, tensor in small.weights.items():
        source = full.weights[name]
        tensor.copy_(source[rows] if name == "embeddings.word_embeddings.weight" else source)
    return small.save(tmp_path_factory.mktemp("small-minilm") / "model")


# ---------------------------------------------------------------------- reading files
def _write(tmp_path: Path, qas: list, context: str = "Paris is in France.",
           name: str = "s.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": context, "qas": qas}]}]}))
    return path


def test_reads_v1_and_v2_files(squad_files, tmp_path):
    examples, v2 = squad.read_squad(squad_files["dev"])
    assert v2 and any(e.impossible for e in examples) and not examples[0].impossible
    for e in examples:
        for text, start in e.answers:
            assert e.context[start:start + len(text)] == text
    path = _write(tmp_path, [{"id": "a", "question": "Where is Paris?",
                              "answers": [{"text": "France", "answer_start": 12},
                                          {"text": "in France", "answer_start": 9}]}])
    (example,), v2 = squad.read_squad(path)
    assert not v2 and example.answers == (("France", 12), ("in France", 9))


@pytest.mark.parametrize("answer,message", [
    ({"text": "France"}, r"qas\[0\] \(id 'a'\): answers\[0\]: no 'answer_start' \(expected the "
                         r"answer's character offset in its context\)"),
    ({"text": "France", "answer_start": 3},
     r"answers\[0\]: the answer 'France' does not match its context at answer_start 3 \(the "
     r"context has 'is is ' there\)"),
    ({"text": "France", "answer_start": "12"}, r"'answer_start' is str, expected"),
])
def test_bad_answers_fail_in_one_line_naming_the_question(tmp_path, answer, message):
    path = _write(tmp_path, [{"id": "a", "question": "Where?", "answers": [answer]}])
    with pytest.raises(DataError, match=f"^{path}: data\\[0\\].paragraphs\\[0\\].*{message}"):
        squad.read_squad(path)


def test_bad_files_fail_in_one_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not JSON"):
        squad.read_squad(path)
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="top level: no 'data'"):
        squad.read_squad(path)
    path = _write(tmp_path, [{"id": "a", "question": "Where?", "answers": []}])
    squad.read_squad(path)  # fine to evaluate on ...
    with pytest.raises(DataError, match="no answers, and 'is_impossible' is not true"):
        squad.read_squad(path, training=True)  # ... not to train on


def test_bad_input_to_train_fails_before_anything_is_written(tmp_path, minilm_dir):
    path = _write(tmp_path, [{"id": "a", "question": "Where?", "answers": [{"text": "x"}]}])
    out = tmp_path / "out"
    cases = [
        (["--data", path], "no 'answer_start'"),
        (["--data", _write(tmp_path, [{"id": "b", "question": "Where?", "answers": [
            {"text": "Paris", "answer_start": 1}]}], name="t.json")], "does not match its "
         "context at answer_start 1 (the context has 'aris ' there)"),
        (["--data", path, "--doc-stride", "128", "--seq-len", "128"],
         "--doc-stride 128 must be less than the context tokens a window holds: --seq-len "
         "128 - --max-query-length 64 - 3 special tokens = 61"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["train", "--task", "qa", "--model", str(minilm_dir),
                                           "--out", str(out), *map(str, args)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("error: ")
        assert not out.exists()


def test_doc_stride_defaults_to_what_a_window_holds():
    data = ("x.json",)
    assert TrainConfig(task="qa", data=data, seq_len=384).doc_stride == 128
    assert TrainConfig(task="qa", data=data, seq_len=128).doc_stride == 30
    assert TrainConfig(task="classify", data=data).doc_stride is None
    trajectory = TrainConfig(task="classify", data=data).trajectory(1)
    assert "doc_stride" not in trajectory and "max_query_length" not in trajectory


# ---------------------------------------------------------------------- windows and labels
def test_answers_map_to_tokens_and_absent_ones_to_cls(squad_files, small_minilm):
    tokenizer = Tokenizer.from_dir(small_minilm)
    examples, _ = squad.read_squad(squad_files["train"])
    windows = squad.training_windows(examples, tokenizer, 64, 16, 24)
    per_pair = np.bincount([w.pair for w in windows.windows])
    assert (per_pair > 1).mean() > 0.4  # many contexts take several windows
    held = 0
    for w, window in enumerate(windows.windows):
        example = examples[window.pair]
        start, end = int(windows.starts[w]), int(windows.ends[w])
        if start == 0:
            assert end == 0
            if example.answers:  # then the window does not hold the whole answer
                text, first = example.answers[0]
                offsets = windows.contexts[window.pair].offsets[window.first:window.last]
                assert not (offsets[0, 0] <= first and first + len(text) <= offsets[-1, 1])
            continue
        held += 1
        assert example.answers and window.context_start <= start <= end
        offsets = windows.contexts[window.pair].offsets
        first, last = window.first + start - window.context_start, \
            window.first + end - window.context_start
        text, at = example.answers[0]
        assert example.context[offsets[first, 0]:offsets[last, 1]] == text
        assert offsets[first, 0] == at
    assert held > len(examples) * 0.5


# ---------------------------------------------------------------------- metrics
def test_metrics_follow_the_official_normalisation():
    assert squad.normalize_answer("The  Golden, Harbor!") == "golden harbor"
    assert squad.exact_match("the Golden Harbor", "golden harbor.") == 1.0
    assert squad.f1_score("golden harbor", "the golden gate harbor") == pytest.approx(0.8)
    assert squad.f1_score("", "") == 1.0 and squad.f1_score("", "x") == 0.0
    assert squad.f1_score("an", "the") == 1.0  # both normalise to nothing
    examples = [squad.QAExample("1", "q", "c", (("Paris", 0), ("the city of Paris", 0)), False),
                squad.QAExample("2", "q", "c", (), True),
                squad.QAExample("3", "q", "c", (("red wine", 0),), False)]
    scores = squad.squad_metrics(examples, {"1": "paris", "2": "", "3": "white wine"})
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert scores["has_answer_f1"] == pytest.approx(75.0)
    assert scores["no_answer_f1"] == 100.0 and scores["total"] == 3


# ---------------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def trained(squad_files, small_minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("qa-run") / "out"
    args = ["train", "--task", "qa", "--model", small_minilm, "--data", squad_files["train"],
            "--eval-data", squad_files["dev"], "--out", out, "--seq-len", "64",
            "--doc-stride", "16", "--max-query-length", "24", "--batch-size", "16",
            "--max-steps", "60", "--lr", "3e-4", "--save-every", "60", "--log-every", "10",
            "--threads", "2", "--no-progress"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return out


def test_fine_tune_reaches_f1_80_on_held_out_questions(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["step"] == 60
    assert final["eval_f1"] >= 80, final
    assert final["eval_has_answer_f1"] >= 75 and final["eval_no_answer_total"] > 0
    assert bertrt.load(trained).head == "question-answering"
    config = json.loads((trained / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]


def test_eval_command_scores_as_training_did(trained, squad_files):
    result = CliRunner().invoke(main, [
        "eval", str(trained), "--data", str(squad_files["dev"]), "--json", "--seq-len", "64",
        "--doc-stride", "16", "--max-query-length", "24", "--backend", "ort"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    final = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["f1"] == pytest.approx(final["eval_f1"], abs=1.0)
    assert metrics["exact_match"] == pytest.approx(final["eval_exact_match"], abs=1.0)
    assert metrics["total"] == final["eval_total"]
    result = CliRunner().invoke(main, ["eval", str(trained), "--data", str(squad_files["dev"]),
                                       "--doc-stride", "400", "--seq-len", "64"])
    assert result.exit_code == 2 and "--doc-stride 400 must be less than" in result.output


def test_trained_model_answers_through_the_engine(trained):
    with bertrt.InferenceEngine(trained, backend="ort") as engine:
        context = ("Markets open early in the morning. The capital of Belisur is Tenvaport. "
                   "Anna Kalo was born in 1888.")
        found = engine.answer(["What is the capital of Belisur?", "When was Anna Kalo born?"],
                              [context, context], max_seq_len=64, doc_stride=16,
                              max_query_length=24)
    assert [a["answer"] for a in found] == ["Tenvaport", "1888"]
    assert qa.MAX_SEQ_LEN == 384
