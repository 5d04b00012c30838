"""Extractive QA at inference: `InferenceEngine.answer` against transformers' question-answering
pipeline on the same weights (MiniLM's encoder with a seeded random span head, saved by bertrt
and loaded by transformers), long contexts of several windows included; the windows and the
n-best search on their own; `bertrt predict` on a QA model.

transformers 5 dropped the question-answering pipeline; there the reference is the pipeline's
own steps: the fast tokenizer's overflowing windows, `BertForQuestionAnswering`'s logits, the
pipeline's `select_starts_ends` (kept in its document-QA module) and the pipeline's
post-processing loop, written out in `_pipeline_steps` as transformers 4.57 has it.
"""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

import bertrt
from bertrt.errors import BertrtError
from bertrt.serve import InferenceEngine, qa

QUESTIONS = ["When was it founded?", "How many inhabitants are there?",
             "What is the climate like?", "Who visited?", "How tall is it?", "Which year?",
             "What is it known for?", "Who won the prize?"]
NAMES = ["Ada Lovelace", "Marie Curie", "the river Thames", "Mount Kilimanjaro", "Tokyo",
         "the Nile", "Niels Bohr", "the Great Wall", "Lake Baikal", "Sir Isaac Newton's apple",
         "Zürich", "São Paulo"]
FACTS = ["was founded in {y}", "has {n} inhabitants", "is known for its {a} climate",
         "was visited by {p} in {y}", "measures {n} metres", "won the prize in {y}",
         "is described as {a} and {a}"]
ADJECTIVES = ["mild", "harsh", "humid", "dry", "windy", "cold", "pleasant", "unpredictable"]


def _pairs(n: int, seed: int, sentences: tuple[int, ...]) -> list[tuple[str, str]]:
    rng = random.Random(seed)

    def sentence() -> str:
        fact = rng.choice(FACTS).format(
            y=rng.randint(1500, 2020), n=f"{rng.randint(1, 99)},{rng.randint(100, 999)}",
            a=rng.choice(ADJECTIVES), p=rng.choice(NAMES))
        return f"{rng.choice(NAMES)} {fact}."

    return [(rng.choice(QUESTIONS), " ".join(sentence() for _ in range(rng.choice(sentences))))
            for _ in range(n)]


@pytest.fixture(scope="module")
def qa_dir(minilm_dir, tmp_path_factory):
    """MiniLM with a span head of seeded random weights large enough to give distinct scores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fresh head
        model = bertrt.load(minilm_dir, head="qa")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.weights["qa_outputs.weight"].copy_(torch.randn(2, 384, generator=gen) * 0.3)
        model.weights["qa_outputs.bias"].copy_(torch.randn(2, generator=gen))
    return model.save(tmp_path_factory.mktemp("qa") / "model")


def _pipeline_steps(model_dir, pairs, max_seq_len=384, doc_stride=128, top_k=1,
                    handle_impossible_answer=False, max_answer_len=15):
    """transformers' question-answering pipeline (4.57) step by step, on its own parts."""
    import transformers

    try:
        from transformers.pipelines.question_answering import select_starts_ends
    except ImportError:  # transformers >= 5
        from transformers.pipelines.document_question_answering import select_starts_ends
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertForQuestionAnswering.from_pretrained(model_dir).eval()
    results = []
    for question, context in pairs:
        enc = tokenizer(question, context, truncation="only_second", max_length=max_seq_len,
                        stride=doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True, return_token_type_ids=True, padding=True,
                        return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        token_type_ids=enc["token_type_ids"])
        min_null, answers = 1000000, []
        for i in range(len(enc["input_ids"])):
            n = int(enc["attention_mask"][i].sum())
            p_mask = [int(s != 1) for s in enc.sequence_ids(i)[:n]]
            p_mask[0] = 0  # [CLS] stays a candidate (the null answer)
            starts, ends, scores, min_null = select_starts_ends(
                out.start_logits[i:i + 1, :n].numpy(), out.end_logits[i:i + 1, :n].numpy(),
                p_mask, enc["attention_mask"][i:i + 1, :n].numpy(), min_null, top_k * 2 + 10,
                handle_impossible_answer, max_answer_len)
            window = enc[i]
            for s, e, score in zip(starts, ends, scores):
                try:
                    a = window.word_to_chars(window.token_to_word(s), sequence_index=1)[0]
                    b = window.word_to_chars(window.token_to_word(e), sequence_index=1)[1]
                except Exception:  # noqa: BLE001 - the pipeline's fallback: token offsets
                    a, b = window.offsets[s][0], window.offsets[e][1]
                same = next((x for x in answers if x["answer"].lower() == context[a:b].lower()),
                            None)
                if same:
                    same["score"] += score.item()
                else:
                    answers.append({"score": score.item(), "start": a, "end": b,
                                    "answer": context[a:b]})
        if handle_impossible_answer:
            answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
        results.append(answers[0] if len(answers) == 1 else answers)
    return results


def _reference(model_dir, pairs, **settings):
    """The pipeline itself where transformers has it, else its steps."""
    import transformers

    try:
        pipe = transformers.pipeline("question-answering", model=str(model_dir),
                                     tokenizer=str(model_dir))
    except KeyError:  # transformers >= 5: no such task
        return _pipeline_steps(model_dir, pairs, **settings)
    return [pipe(question=q, context=c, **settings) for q, c in pairs]


def _same(got, want, rel=1e-4):
    got = got if isinstance(got, list) else [got]
    want = want if isinstance(want, list) else [want]
    assert [(a["answer"], a["start"], a["end"]) for a in got] == \
        [(a["answer"], a["start"], a["end"]) for a in want]
    for a, b in zip(got, want):
        assert a["score"] == pytest.approx(b["score"], rel=rel, abs=1e-12)


@pytest.mark.parametrize("backend,packed,settings,ours", [
    # short windows: most contexts span several, overlapping by 16 tokens
    ("ort", True, dict(max_seq_len=64, doc_stride=16), dict(max_seq_len=64, doc_stride=16)),
    # the defaults (384 tokens, stride 128), 3 answers and the null answer competing
    ("torch", False, dict(top_k=3, handle_impossible_answer=True),
     dict(top_k=3, null_threshold=0.0)),
])
def test_answers_equal_the_transformers_pipeline(qa_dir, backend, packed, settings, ours):
    # 52 pairs over short windows; 20 with the defaults, 45 sentences being ~600 tokens
    pairs = _pairs(52, 3, (2, 4, 8, 12)) if packed else _pairs(20, 4, (2, 8, 45))
    want = _reference(qa_dir, pairs, **settings)
    with InferenceEngine(qa_dir, backend=backend, packed=packed, threads=2) as engine:
        got = engine.answer([q for q, _ in pairs], [c for _, c in pairs], **ours)
    for (question, context), g, w in zip(pairs, got, want):
        _same(g, w)
        for answer in g if isinstance(g, list) else [g]:
            assert context[answer["start"]:answer["end"]] == answer["answer"]
    windows = qa.make_windows(engine.tokenizer,
                              qa.encode_questions(engine.tokenizer, [q for q, _ in pairs], 64),
                              qa.encode_contexts(engine.tokenizer, [c for _, c in pairs]),
                              ours.get("max_seq_len", 384), ours.get("doc_stride", 128))
    counts = np.bincount([w.pair for w in windows])
    assert (counts > 1).sum() >= 5 and counts.max() >= (3 if packed else 2)  # long contexts


def test_windows_are_the_tokenizers_overflowing_windows(qa_dir):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(qa_dir)
    tok = bertrt.Tokenizer.from_dir(qa_dir)
    pairs = _pairs(20, seed=5, sentences=(3, 12))
    windows = qa.make_windows(tok, qa.encode_questions(tok, [q for q, _ in pairs], 64),
                              qa.encode_contexts(tok, [c for _, c in pairs]), 40, 7)
    for k, (question, context) in enumerate(pairs):
        enc = hf(question, context, truncation="only_second", max_length=40, stride=7,
                 return_overflowing_tokens=True)
        assert [w.input_ids.tolist() for w in windows if w.pair == k] == enc["input_ids"]
        assert [w.token_type_ids.tolist() for w in windows if w.pair == k] == \
            enc["token_type_ids"]


def test_window_spans_overlap_by_the_stride_and_end_at_the_context_end():
    assert qa.window_spans(0, 10, 3) == [(0, 0)]
    assert qa.window_spans(10, 10, 3) == [(0, 10)]
    assert qa.window_spans(11, 10, 3) == [(0, 10), (7, 11)]
    assert qa.window_spans(25, 10, 4) == [(0, 10), (6, 16), (12, 22), (18, 25)]


def test_best_spans_respect_order_and_length():
    p_start = np.array([0.1, 0.6, 0.3])
    p_end = np.array([0.5, 0.1, 0.4])
    spans = qa.best_spans(p_start, p_end, 10, max_answer_length=2)
    assert [(s, e) for s, e, _ in spans] == [(1, 2), (2, 2), (1, 1), (0, 0), (0, 1)]
    assert spans[0][2] == pytest.approx(0.24)
    assert all(0 <= e - s < 2 for s, e, _ in spans)


def test_answer_errors_are_one_line(qa_dir, minilm_dir):
    with InferenceEngine(qa_dir, backend="torch") as engine:
        with pytest.raises(BertrtError, match="2 questions but 1 contexts"):
            engine.answer(["a?", "b?"], ["c"])
        with pytest.raises(BertrtError, match=r"contexts\[0\]: empty"):
            engine.answer(["a?"], [" "])
        with pytest.raises(BertrtError, match="must be more than doc_stride=30"):
            engine.answer(["a?"], ["some context"], max_seq_len=32, doc_stride=30)
        with pytest.raises(BertrtError, match="needs a sequence classifier.*use answer"):
            engine.predict(["a text"])
    with InferenceEngine(minilm_dir, backend="torch") as engine, \
            pytest.raises(BertrtError, match="needs an extractive question-answering model"):
        engine.answer(["a?"], ["b"])


def _cli(*args):
    from click.testing import CliRunner

    from bertrt.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_predict_answers_questions(qa_dir, tmp_path):
    pairs = _pairs(6, seed=9, sentences=(2, 6))
    (tmp_path / "q.txt").write_text("".join(q + "\n" for q, _ in pairs))
    (tmp_path / "c.txt").write_text("".join(c + "\n" for _, c in pairs))
    result = _cli("predict", qa_dir, "--questions", tmp_path / "q.txt", "--contexts",
                  tmp_path / "c.txt", "--backend", "torch")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    with InferenceEngine(qa_dir, backend="torch") as engine:
        assert rows == engine.answer([q for q, _ in pairs], [c for _, c in pairs])
    squad = {"data": [{"paragraphs": [{"context": c, "qas": [{"id": f"x{i}", "question": q,
                                                             "answers": []}]}
                                      for i, (q, c) in enumerate(pairs)]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    result = _cli("predict", qa_dir, "--squad", tmp_path / "s.json", "--backend", "torch",
                  "--top-k", "2")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [f"x{i}" for i in range(6)]
    assert all(len(r["answers"]) == 2 for r in rows)
    result = _cli("predict", qa_dir, "--texts", tmp_path / "q.txt", "--backend", "torch")
    assert result.exit_code == 2
    assert "give --questions and --contexts" in result.output
    result = _cli("predict", qa_dir, "--questions", tmp_path / "q.txt", "--backend", "torch")
    assert result.exit_code == 2 and "--contexts FILE is required" in result.output
