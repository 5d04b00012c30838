"""Fine-tuning data (classification files, CoNLL tagging) and their metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bertrt.tokenizer import SPECIAL_TOKENS, Tokenizer
from bertrt.train import tasks
from bertrt.train.corpus import DataError, invalid_utf8
from bertrt.train.data import ExampleSource
from bertrt.train.tasks import (
    classification_metrics,
    classification_source,
    collate_classification,
    collate_tagging,
    get_entities,
    tagging_metrics,
    tagging_source,
)

WORDS = ["good", "bad", "movie", "film", "plot", "was", "the", "a", "john", "lives", "in", "new",
         "york", "un", "##believ", "##able", "paris", ",", ".", "!"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer([*SPECIAL_TOKENS, *WORDS])


def ids(tok: Tokenizer, text: str) -> list[int]:
    return [tok.token_to_id(t) for t in text.split()]


# ------------------------------------------------------------------------- classification

def test_csv_string_labels_and_pairs(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text,text_pair,label\n'
                    'good movie,"the plot, was good",pos\n'
                    'bad film,bad plot,neg\n'
                    '\n'
                    'a film,the movie,neutral\n'
                    'good,good,pos\n')
    src, labels, n_truncated = classification_source(path, tok, seq_len=32, seed=0,
                                                     shuffle=False)
    assert isinstance(src, ExampleSource)
    assert labels == ["neg", "neutral", "pos"] and n_truncated == 0 and len(src) == 4
    assert [src[i].label for i in range(4)] == [2, 0, 1, 2]
    first = src[0]
    assert first.input_ids == [tok.cls_id, *ids(tok, "good movie"), tok.sep_id,
                               *ids(tok, "the plot , was good"), tok.sep_id]
    assert first.token_type_ids == [0] * 4 + [1] * 6
    # shuffled (the default): a permutation of the rows, another order each epoch
    shuffled, _, _ = classification_source(path, tok, seq_len=32, seed=0)
    epoch0 = [shuffled[i].input_ids for i in range(4)]
    epochs = [[shuffled[i].input_ids for i in range(4 * e, 4 * e + 4)] for e in range(1, 6)]
    rows = [src[i].input_ids for i in range(4)]
    assert sorted(epoch0) == sorted(rows)
    assert any(e != epoch0 for e in epochs)


def test_integer_labels_sort_numerically_and_jsonl(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"text": "good", "label": 10}, {"text": "bad", "label": "2"},
            {"text": "film", "label": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src, labels, _ = classification_source(path, tok, seq_len=8, seed=0, shuffle=False)
    assert labels == ["0", "2", "10"]
    assert [src[i].label for i in range(3)] == [2, 1, 0]
    assert src[0].input_ids == [tok.cls_id, tok.token_to_id("good"), tok.sep_id]


def test_tsv_is_unquoted(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text('text\tlabel\n"good movie\tpos\nbad"\tneg\n')
    src, labels, _ = classification_source(path, tok, seq_len=8, seed=0, shuffle=False)
    assert labels == ["neg", "pos"] and len(src) == 2  # the quotes are text, not quoting


def test_truncation_is_counted(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("text,text_pair,label\n"
                    + "good " * 20 + ",bad,x\n"          # 20 + 1 + 3 > 10
                    + "good movie,bad film,y\n"             # 2 + 2 + 3 <= 10
                    + "good " * 6 + "," + "bad " * 6 + ",x\n")
    src, _, n_truncated = classification_source(path, tok, seq_len=10, seed=0, shuffle=False)
    assert n_truncated == 2
    assert [len(src[i].input_ids) for i in range(3)] == [10, 7, 10]
    good, bad = tok.token_to_id("good"), tok.token_to_id("bad")
    # longest first: the long text gives way, the short pair is kept whole
    assert src[0].input_ids == [tok.cls_id, *[good] * 6, tok.sep_id, bad, tok.sep_id]
    assert src[2].input_ids == [tok.cls_id, *[good] * 3, tok.sep_id, *[bad] * 4, tok.sep_id]


@pytest.mark.parametrize("name, content, message", [
    ("nolabel.csv", "text,target\ngood,pos\n", "nolabel.csv: line 1: no 'label' column"),
    ("notext.csv", "sentence,label\ngood,pos\n", "notext.csv: line 1: no 'text' column"),
    ("empty.csv", "", "empty.csv: the file is empty"),
    ("header.csv", "text,label\n\n", "header.csv: no examples"),
    ("fields.csv", "text,label\ngood,pos\nbad,neg,extra\n",
     "fields.csv: line 3: expected 2 fields"),
    ("blank.csv", "text,label\ngood,pos\nbad,\n", "blank.csv: line 3, column 'label': empty"),
    ("nolabel.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad"}\n',
     "nolabel.jsonl: line 2: no 'label' field"),
    ("badtype.jsonl", '{"text": "good", "label": [1]}\n',
     "badtype.jsonl: line 1, column 'label': expected a string or an integer"),
    ("data.txt", "text,label\n", "data.txt: unknown format '.txt'"),
])
def test_classification_errors(tok: Tokenizer, tmp_path: Path, name: str, content: str,
                               message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        classification_source(path, tok, seq_len=8, seed=0)


def test_eval_labels_follow_training_and_unseen_is_an_error(tok: Tokenizer,
                                                            tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("text,label\ngood,pos\nbad,neg\n")
    _, labels, _ = classification_source(train, tok, seq_len=8, seed=0)
    label2id = {name: i for i, name in enumerate(labels)}
    ok = tmp_path / "eval.csv"
    ok.write_text("text,label\nbad,neg\n")
    src, eval_labels, _ = classification_source(ok, tok, seq_len=8, seed=0, label2id=label2id)
    assert eval_labels == labels and src[0].label == label2id["neg"]
    bad = tmp_path / "eval_bad.csv"
    bad.write_text("text,label\nbad,neg\ngood,pos\nfilm,meh\n")
    with pytest.raises(DataError, match=r"eval_bad.csv: line 4, column 'label': label 'meh' "
                                        r"was not seen in training"):
        classification_source(bad, tok, seq_len=8, seed=0, label2id=label2id)


def test_invalid_utf8_in_csv(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\ngood,pos\nb\xe9d,neg\n")
    with pytest.raises(DataError, match="bad.csv: line 3: invalid UTF-8") as caught:
        classification_source(path, tok, seq_len=8, seed=0)
    assert str(caught.value) == str(invalid_utf8(path, 3, 1))  # one wording, CoNLL's too
    conll = tmp_path / "bad.conll"
    conll.write_bytes(b"John B-PER\nb\xe9d O\n")
    with pytest.raises(DataError) as caught:
        tagging_source(conll, tok, seq_len=8, seed=0)
    assert str(caught.value) == str(invalid_utf8(conll, 2, 1))


def test_a_long_csv_field_is_read_and_one_over_the_limit_named(tok: Tokenizer, tmp_path: Path,
                                                               monkeypatch) -> None:
    path = tmp_path / "long.csv"
    path.write_text(f'text,label\n"{"good " * 60_000}",pos\nbad,neg\n')  # 300 kB > csv's 128 kB
    source, labels, truncated = classification_source(path, tok, seq_len=8, seed=0)
    assert len(source) == 2 and labels == ["neg", "pos"] and truncated == 1
    monkeypatch.setattr(tasks, "CSV_FIELD_LIMIT", 1000)
    with pytest.raises(DataError) as caught:
        classification_source(path, tok, seq_len=8, seed=0)
    assert str(caught.value) == (
        f"{path}: line 2: a field is larger than the CSV field limit (1,000 characters, "
        "bertrt.train.tasks.CSV_FIELD_LIMIT)")


def test_collate_classification(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood movie was good,pos\nbad,neg\n")
    src, _, _ = classification_source(path, tok, seq_len=16, seed=0, shuffle=False)
    batch = collate_classification([src[0], src[1]], tok.pad_id)
    assert batch["input_ids"].shape == (2, 6) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [tok.pad_id] * 3
    assert batch["labels"].tolist() == [1, 0]
    assert batch["token_type_ids"].sum() == 0


# -------------------------------------------------------------------------------- tagging

CONLL = """-DOCSTART- -X- -X- O

John NNP B-NP B-PER
lives VBZ B-VP O
in IN B-PP O
New NNP B-NP B-LOC
York NNP I-NP I-LOC
.	.	O	O

-DOCSTART- -X- -X- O
unbelievable JJ O O
Paris NNP B-NP B-LOC
"""


def test_conll_parsing_and_first_subtoken_labels(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.conll"
    path.write_text(CONLL)
    src, labels, n_truncated = tagging_source(path, tok, seq_len=32, seed=0, shuffle=False)
    assert labels == ["B-LOC", "B-PER", "I-LOC", "O"] and n_truncated == 0
    assert len(src) == 2  # -DOCSTART- lines are not sentences
    L = {name: i for i, name in enumerate(labels)}
    first = src[0]
    assert first.input_ids == [tok.cls_id, *ids(tok, "john lives in new york ."), tok.sep_id]
    assert first.tags == [-100, L["B-PER"], L["O"], L["O"], L["B-LOC"], L["I-LOC"], L["O"],
                          -100]
    assert first.words == [-1, 0, 1, 2, 3, 4, 5, -1]
    second = src[1]  # "unbelievable" -> un ##believ ##able: the tag on "un" only
    assert second.input_ids == [tok.cls_id, *ids(tok, "un ##believ ##able paris"), tok.sep_id]
    assert second.tags == [-100, L["O"], -100, -100, L["B-LOC"], -100]
    assert second.words == [-1, 0, 0, 0, 1, -1]
    assert second.token_type_ids == [0] * 6 and second.label == -100


def test_tagging_truncation_unseen_tag_and_bad_line(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.conll"
    path.write_text(CONLL)
    src, labels, n_truncated = tagging_source(path, tok, seq_len=5, seed=0, shuffle=False)
    assert n_truncated == 2
    assert src[0].input_ids == [tok.cls_id, *ids(tok, "john lives in"), tok.sep_id]
    assert src[1].tags[-1] == -100 and len(src[1].input_ids) == 5
    eval_path = tmp_path / "eval.conll"
    eval_path.write_text("John B-PER\n\nParis B-LOC\nrocks B-MISC\n")
    label2id = {name: i for i, name in enumerate(labels)}
    with pytest.raises(DataError, match=r"eval.conll: line 4.*label 'B-MISC' was not seen"):
        tagging_source(eval_path, tok, seq_len=16, seed=0, label2id=label2id)
    bad = tmp_path / "bad.conll"
    bad.write_text("John B-PER\nlives\n")
    with pytest.raises(DataError, match="bad.conll: line 2: expected a token and a tag"):
        tagging_source(bad, tok, seq_len=16, seed=0)
    empty = tmp_path / "empty.conll"
    empty.write_text("-DOCSTART- O\n\n")
    with pytest.raises(DataError, match="empty.conll: no sentences"):
        tagging_source(empty, tok, seq_len=16, seed=0)


def test_collate_tagging_pads_labels_with_ignore(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.conll"
    path.write_text(CONLL)
    src, _, _ = tagging_source(path, tok, seq_len=32, seed=0, shuffle=False)
    batch = collate_tagging([src[1], src[0]], tok.pad_id)
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [*src[1].tags, -100, -100]
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0, 0]


# -------------------------------------------------------------------------------- metrics

def test_classification_metrics_by_hand() -> None:
    preds, gold = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    m = classification_metrics(preds, gold, num_labels=3)
    # class 0: tp 1, 2 gold, 2 predicted -> F1 1/2; class 1: tp 2, 3 and 3 -> F1 2/3;
    # class 2 appears nowhere and is left out of the average.
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    m = classification_metrics(np.array([2, 0]), np.array([0, 0]), num_labels=3)
    # class 0: tp 1, gold 2, pred 1 -> 2/3; class 2: predicted, never gold -> 0
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx(1 / 3)
    assert classification_metrics(np.array([1, 1]), np.array([1, 1]), 2)["macro_f1"] == 1.0


def test_get_entities_seqeval_rules() -> None:
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # An I- after O, or after another type, starts an entity (seqeval's default mode).
    assert get_entities(["O", "I-PER", "I-LOC", "B-LOC", "B-LOC"]) == [
        ("PER", 1, 1), ("LOC", 2, 2), ("LOC", 3, 3), ("LOC", 4, 4)]
    assert get_entities(["O", "O"]) == []


def test_tagging_metrics_by_hand() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"], ["I-PER", "I-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-LOC"], ["B-PER", "I-PER"]]
    m = tagging_metrics(pred, gold)
    # tokens: 3 + 1 + 1 of 8 right. Gold entities: PER(0-1), LOC(3), ORG(0), PER(0-1) = 4;
    # predicted: PER(0-1), ORG(3), ORG(0), LOC(1), PER(0-1) = 5; correct: PER, ORG, PER = 3.
    assert m["accuracy"] == m["token_accuracy"] == pytest.approx(5 / 8)
    assert (m["n_gold"], m["n_pred"], m["n_correct"]) == (4, 5, 3)
    assert m["precision"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    # An entity cut at a sentence end does not run into the next sentence.
    m = tagging_metrics([["B-PER"], ["I-PER"]], [["B-PER", ], ["B-PER"]])
    assert m["f1"] == 1.0 and m["accuracy"] == 0.5
    with pytest.raises(ValueError, match="sentence 0"):
        tagging_metrics([["O"]], [["O", "O"]])


# ----------------------------------------------------------------------- vocabularies
def test_a_task_vocabulary_is_trained_on_its_text_only(tmp_path: Path) -> None:
    from bertrt.train.task import ClassifyTask, PretrainTask, TagTask

    texts = ["the film was good", "the plot was bad", "a good movie", "a bad film"] * 20
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("text,label\n" + "".join(f"{t},zzpositive\n" for t in texts))
    conll = tmp_path / "train.conll"
    conll.write_text("".join(f"{w} XXPOS B-QQORG\n" + ("\n" if k % 4 == 3 else "")
                             for k, w in enumerate(" ".join(texts).split())))
    for task, path, label in ((ClassifyTask, csv_path, "zzpositive"),
                              (TagTask, conll, "qqorg"), (TagTask, conll, "xxpos")):
        with pytest.warns(UserWarning) as said:  # a small corpus gives fewer tokens than asked
            vocab = task.train_vocab([path], 1000).vocab
        assert "film" in vocab and label not in vocab, (task, label)
        assert [str(w.message).split(": ")[0] for w in said] == [str(path)]  # named by file
    empty = tmp_path / "header.csv"
    empty.write_text("text,label\n\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    for task, path in ((ClassifyTask, empty), (PretrainTask, blank)):
        with pytest.raises(DataError) as caught:
            task.train_vocab([path], 200)
        assert str(caught.value).startswith(f"{path}: ") and "train_vocab" not in str(caught.value)
