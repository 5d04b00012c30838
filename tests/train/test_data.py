"""Pre-training data: corpora, NSP instances, dynamic masking, batch layout, embedded corpus.

The synthetic corpus spells every token as ``d<doc>t<position>`` (one wordpiece each), so any
token says which document it came from and where: true continuations and random segments can be
checked exactly.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shlex
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bertrt.tokenizer import SPECIAL_TOKENS, Tokenizer
from bertrt.train.config import TrainConfig
from bertrt.train.corpus import (
    DataError,
    embedded_corpus,
    invalid_utf8,
    read_documents,
    split_sentences,
)
from bertrt.train.data import (
    Example,
    ExampleSource,
    batch_indices,
    collate_pretraining,
    pretraining_source,
)

TOKEN = re.compile(r"d(\d+)t(\d+)")
N_DOCS, MAX_DOC_TOKENS = 30, 150


def make_corpus(seed: int = 0, n_docs: int = N_DOCS, sentences: tuple[int, int] = (4, 12),
                lengths: tuple[int, int] = (3, 12)) -> list[list[list[str]]]:
    """Documents of sentences of ``d<doc>t<pos>`` words, ``pos`` counting through the doc."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        pos, doc = 0, []
        for _ in range(rng.randint(*sentences)):
            n = rng.randint(*lengths)
            doc.append([f"d{d}t{p}" for p in range(pos, pos + n)])
            pos += n
        assert pos <= MAX_DOC_TOKENS
        docs.append(doc)
    return docs


def write_text(path: Path, docs: list[list[list[str]]]) -> Path:
    path.write_text("\n\n".join("\n".join(" ".join(s) for s in doc) for doc in docs) + "\n")
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    words = [f"d{d}t{p}" for d in range(N_DOCS) for p in range(MAX_DOC_TOKENS)]
    return Tokenizer([*SPECIAL_TOKENS, *words, "##z", "."])


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("corpus") / "docs.txt", make_corpus())


def where(tok: Tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """(doc, position) of each synthetic token."""
    out = []
    for i in ids:
        m = TOKEN.fullmatch(tok.id_to_token(i))
        assert m, tok.id_to_token(i)
        out.append((int(m[1]), int(m[2])))
    return out


def segments(tok: Tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    ids = ex.input_ids
    sep = [k for k, i in enumerate(ids) if i == tok.sep_id]
    return ids[1:sep[0]], ids[sep[0] + 1:sep[1]]


# ------------------------------------------------------------------------------ instances

def test_segment_structure_and_lengths(tok: Tokenizer, corpus_file: Path) -> None:
    src = pretraining_source([corpus_file], tok, seq_len=40, seed=0)
    assert isinstance(src, ExampleSource)
    assert len(src) > 50
    for i in range(len(src)):
        ex = src[i]
        ids, types = ex.input_ids, ex.token_type_ids
        assert len(ids) == len(types) == len(ex.words) <= 40
        sep = [k for k, t in enumerate(ids) if t == tok.sep_id]
        assert ids[0] == tok.cls_id and len(sep) == 2 and sep[1] == len(ids) - 1
        assert 1 < sep[0] < sep[1] - 1  # both segments non-empty
        assert types == [0] * (sep[0] + 1) + [1] * (len(ids) - sep[0] - 1)
        assert all(t not in tok.special_ids for k, t in enumerate(ids) if k not in (0, *sep))
        assert [w for k, w in enumerate(ex.words) if k in (0, *sep)] == [-1, -1, -1]
        assert ex.label in (0, 1) and ex.tags is None


def test_nsp_balanced_and_true_continuations(tok: Tokenizer, corpus_file: Path) -> None:
    src = pretraining_source([corpus_file], tok, seq_len=40, seed=1, dupe_factor=3)
    labels = Counter()
    adjacent = 0
    for i in range(len(src)):
        ex = src[i]
        a, b = (where(tok, s) for s in segments(tok, ex))
        labels[ex.label] += 1
        for seg in (a, b):  # each segment is one contiguous span of one document
            assert len({d for d, _ in seg}) == 1
            assert [p for _, p in seg] == list(range(seg[0][1], seg[0][1] + len(seg)))
        if ex.label == 0:
            assert a[0][0] == b[0][0] and b[0][1] > a[-1][1]
            if b[0][1] == a[-1][1] + 1:
                adjacent += 1
            else:  # only truncation (to seq_len) separates A from B
                assert len(ex.input_ids) == 40
        else:
            assert a[0][0] != b[0][0]
    assert 0.42 < labels[0] / len(src) < 0.58, labels
    assert adjacent > 0.5 * labels[0]


def test_short_seq_prob_gives_shorter_instances(tok: Tokenizer, corpus_file: Path) -> None:
    def lengths(p: float) -> np.ndarray:
        src = pretraining_source([corpus_file], tok, seq_len=40, seed=0, short_seq_prob=p,
                                 dupe_factor=3)
        return np.array([len(src[i].input_ids) for i in range(len(src))])

    never, half, always = lengths(0.0), lengths(0.5), lengths(1.0)
    # Without short targets, only document ends make short instances.
    assert never.mean() > half.mean() + 2 > always.mean() + 4
    assert (always < 20).mean() > (never < 20).mean() + 0.1
    assert len(never) < len(half) < len(always)  # shorter targets: more instances


def test_deterministic_for_seed_and_reshuffled_per_epoch(tok: Tokenizer,
                                                         corpus_file: Path) -> None:
    a = pretraining_source([corpus_file], tok, seq_len=40, seed=7)
    b = pretraining_source([corpus_file], tok, seq_len=40, seed=7)
    c = pretraining_source([corpus_file], tok, seq_len=40, seed=8)
    n = len(a)
    idx = [0, 1, 5, n - 1, n, n + 3, 5 * n + 2]
    assert [a[i] for i in idx] == [b[i] for i in idx]
    assert [a[i] for i in range(20)] != [c[i] for i in range(20)]
    # Another process: the pickled source gives the same examples.
    clone = pickle.loads(pickle.dumps(a))
    assert [clone[i] for i in reversed(idx)] == [a[i] for i in reversed(idx)]
    # Epoch 1 holds the same examples as epoch 0, in another order.
    epoch0 = [tuple(a[i].input_ids) for i in range(n)]
    epoch1 = [tuple(a[i].input_ids) for i in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    with pytest.raises(IndexError):
        a[-1]


def test_single_sentence_documents(tok: Tokenizer, tmp_path: Path) -> None:
    docs = make_corpus(seed=2, sentences=(1, 1), lengths=(4, 12))
    blank_separated = write_text(tmp_path / "single.txt", docs)
    one_per_line = tmp_path / "lines.txt"
    one_per_line.write_text("".join(" ".join(doc[0]) + "\n" for doc in docs))
    assert list(read_documents(one_per_line)) == list(read_documents(blank_separated))
    for path in (blank_separated, one_per_line):
        src = pretraining_source([path], tok, seq_len=64, seed=0, dupe_factor=8)
        labels = [src[i].label for i in range(len(src))]
        assert 0.35 < labels.count(0) / len(labels) < 0.65
        for i in range(len(src)):
            a, b = (where(tok, s) for s in segments(tok, src[i]))
            if src[i].label == 0:  # split inside the sentence: B goes on where A stops
                assert a[0][0] == b[0][0] and b[0][1] == a[-1][1] + 1
            else:
                assert a[0][0] != b[0][0]


def test_single_document_corpus(tok: Tokenizer, tmp_path: Path) -> None:
    docs = make_corpus(seed=3, n_docs=1, sentences=(20, 20), lengths=(3, 6))
    path = write_text(tmp_path / "one.txt", docs)
    src = pretraining_source([path], tok, seq_len=256, seed=0, dupe_factor=10)
    labels = Counter()
    for i in range(len(src)):
        a, b = (where(tok, s) for s in segments(tok, src[i]))
        labels[src[i].label] += 1
        if src[i].label == 0:
            assert b[0][1] == a[-1][1] + 1
        else:  # the "random" span never starts at the true next token
            assert b[0][1] != a[-1][1] + 1
    assert labels[0] > 0 and labels[1] > 0


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b'{"text": ""}\n'])
def test_empty_corpus_is_an_error(tok: Tokenizer, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / ("empty.jsonl" if content.startswith(b"{") else "empty.txt")
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*empty"):
        pretraining_source([path], tok, seq_len=32, seed=0)


def test_missing_file_is_an_error(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt: file not found"):
        pretraining_source([tmp_path / "nope.txt"], tok, seq_len=32, seed=0)


def test_jsonl_input(tok: Tokenizer, tmp_path: Path) -> None:
    docs = make_corpus(seed=4)
    # Each object's text holds its sentences joined by spaces, as "D4t0 d4t1 d4t2." (the
    # tokenizer lower-cases): the splitter must find the sentence ends again.
    sentences = [[" ".join(s).capitalize() + "." for s in doc] for doc in docs]
    lines = [json.dumps({"text": " ".join(doc), "id": k}) for k, doc in enumerate(sentences)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    assert list(read_documents(path)) == sentences
    src = pretraining_source([path], tok, seq_len=40, seed=0)
    assert len(src) > 30
    for i in range(len(src)):
        a, b = segments(tok, src[i])
        dot = tok.token_to_id(".")
        a_pos = where(tok, [t for t in a if t != dot])
        b_pos = where(tok, [t for t in b if t != dot])
        if src[i].label == 0 and a_pos and b_pos:
            assert a_pos[0][0] == b_pos[0][0] and b_pos[0][1] > a_pos[-1][1]


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "line 2: expected a JSON object"),
    ('{"txt": "a"}', "line 2: no 'text' field"),
    ('{"text": 3}', 'line 2: "text" must be a string'),
    ("{oops", "line 2: invalid JSON"),
])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "Fine. Really."}\n' + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl: {re.escape(message)}"):
        list(read_documents(path))


def test_invalid_utf8_fails_with_line_number(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"d0t0 d0t1\nd0t2 d0t3\n\nd1t0 \xff\xfe d1t1\n")
    with pytest.raises(DataError, match=r"bad.txt: line 4: invalid UTF-8 \(byte 6"):
        list(read_documents(path))
    with pytest.raises(DataError, match=r"bad.txt: line 4: invalid UTF-8"):
        pretraining_source([path], tok, seq_len=32, seed=0)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid UTF-8"):
        list(read_documents(jsonl))


def test_invalid_utf8_hint_converts_the_file(tmp_path: Path) -> None:
    path = tmp_path / "my corpus.txt"
    path.write_bytes("caf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        list(read_documents(path))
    quoted = shlex.quote(str(path))
    assert str(caught.value) == (
        f"{path}: line 1: invalid UTF-8 (byte 4 of the line); convert the file to UTF-8, e.g. "
        f"from Latin-1: iconv -f latin1 -t utf-8 {quoted} > {shlex.quote(str(path) + '.utf8')}")
    assert str(caught.value) == str(invalid_utf8(path, 1, 3))  # the one wording


def test_sentences_longer_than_an_example_are_counted(tok: Tokenizer, tmp_path: Path) -> None:
    from bertrt.train.task import PretrainTask

    long_line = " ".join(f"d1t{p % 150}" for p in range(400))  # no sentence end: one sentence
    path = write_text(tmp_path / "long.txt", [[["d0t0", "d0t1"], ["d0t2"]], [[long_line]]])
    source = pretraining_source([path], tok, seq_len=32, seed=0)
    assert source.stats["long_sentences"] == 1
    said: list[str] = []
    cfg = TrainConfig(data=(str(path),), seq_len=32)
    PretrainTask.build(cfg, tok, [path], None, said.append)
    assert said == [f"warning: {path}: 1 sentence(s) longer than --seq-len 32 allows (29 tokens) "
                    "were cut to fit; write one sentence per line to train on all of them"]


def test_read_documents_formats(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst  sentence.\r\nSecond one.\r\n\r\n\r\nOther doc.\n\n")
    assert list(read_documents(path)) == [["First sentence.", "Second one."], ["Other doc."]]
    lines = tmp_path / "lines.txt"
    lines.write_text("One doc. It has two sentences.\nAnother doc, e.g. this one. Yes!\n")
    assert list(read_documents(lines)) == [
        ["One doc.", "It has two sentences."], ["Another doc, e.g. this one.", "Yes!"]]
    assert split_sentences("Mr. Smith came. He left.\n\nNew paragraph") == [
        "Mr. Smith came.", "He left.", "New paragraph"]


# -------------------------------------------------------------------------------- masking

@pytest.fixture(scope="module")
def source(tok: Tokenizer, corpus_file: Path):
    return pretraining_source([corpus_file], tok, seq_len=48, seed=0, dupe_factor=2)


def test_masking_statistics(tok: Tokenizer, source) -> None:
    n_candidates = n_masked = n_mask = n_same = n_random = 0
    for start in range(0, 1600, 64):
        indices = list(range(start, start + 64))
        examples = [source[i] for i in indices]
        batch = collate_pretraining(examples, indices, tok, seed=3)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        B, S = ids.shape
        original = torch.full((B, S), tok.pad_id, dtype=torch.int64)
        for b, ex in enumerate(examples):
            original[b, :len(ex.input_ids)] = torch.tensor(ex.input_ids)
            assert attn[b].sum() == len(ex.input_ids)
        pos = batch["masked_positions"]
        assert pos.dtype == torch.int64 and torch.all(pos[1:] > pos[:-1])  # sorted, unique
        flat_orig, flat_new = original.reshape(-1), ids.reshape(-1)
        special = torch.tensor(sorted(tok.special_ids))
        assert not torch.isin(flat_orig[pos], special).any()  # never [CLS]/[SEP]/[PAD]
        assert torch.equal(batch["mlm_labels"], flat_orig[pos])
        unmasked = torch.ones(B * S, dtype=torch.bool)
        unmasked[pos] = False
        assert torch.equal(flat_new[unmasked], flat_orig[unmasked])
        new = flat_new[pos]
        n_mask += int((new == tok.mask_id).sum())
        n_same += int((new == flat_orig[pos]).sum())
        rand = (new != tok.mask_id) & (new != flat_orig[pos])
        n_random += int(rand.sum())
        assert not torch.isin(new[rand], special).any()
        n_masked += len(pos)
        n_candidates += int((~torch.isin(flat_orig, special)).sum())
        assert torch.equal(batch["nsp_labels"], torch.tensor([e.label for e in examples]))
        # every example gets at least one prediction
        assert torch.equal(torch.unique(pos // S), torch.arange(B))
    assert abs(n_masked / n_candidates - 0.15) < 0.01
    assert abs(n_mask / n_masked - 0.8) < 0.02
    assert abs(n_same / n_masked - 0.1) < 0.015
    assert abs(n_random / n_masked - 0.1) < 0.015


def unflatten(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """Per example: (corrupted unpadded ids, masked positions within the example)."""
    B, S = batch["input_ids"].shape
    pos = batch["masked_positions"]
    out = []
    for b in range(B):
        n = int(batch["attention_mask"][b].sum())
        out.append((batch["input_ids"][b, :n].tolist(), (pos[pos // S == b] % S).tolist()))
    return out


def test_masking_depends_only_on_seed_and_index(tok: Tokenizer, source) -> None:
    ex = {i: source[i] for i in (3, 10, 11, 12, 40)}
    first = unflatten(collate_pretraining([ex[10], ex[11], ex[12]], [10, 11, 12], tok, seed=5))
    other = unflatten(collate_pretraining([ex[12], ex[40], ex[3], ex[10]], [12, 40, 3, 10], tok,
                                          seed=5, pad_to=64))
    assert other[0] == first[2] and other[3] == first[0]
    alone = unflatten(collate_pretraining([ex[11]], [11], tok, seed=5))
    assert alone[0] == first[1]
    # Another seed, or the same example at another index (a later epoch), is masked otherwise.
    reseeded = unflatten(collate_pretraining([ex[10]], [10], tok, seed=6))
    later = unflatten(collate_pretraining([ex[10]], [10 + len(source)], tok, seed=5))
    assert reseeded[0] != first[0] and later[0] != first[0]


def test_short_examples_get_one_mask_and_pad_to(tok: Tokenizer) -> None:
    ids = [tok.cls_id, 7, tok.sep_id, 8, tok.sep_id]
    ex = Example(ids, [0, 0, 0, 1, 1], label=1)
    batch = collate_pretraining([ex, ex], [0, 1], tok, seed=0, pad_to=8)
    assert batch["input_ids"].shape == (2, 8)
    assert len(batch["masked_positions"]) == 2
    assert set((batch["masked_positions"] % 8).tolist()) <= {1, 3}
    with pytest.raises(ValueError, match="pad_to=4"):
        collate_pretraining([ex], [0], tok, seed=0, pad_to=4)


def test_whole_word_masking(tok: Tokenizer, tmp_path: Path) -> None:
    rng = random.Random(0)
    docs = [[[f"d{d}t{p}" + ("z" if rng.random() < 0.5 else "") for p in range(s, s + 8)]
             for s in range(0, 64, 8)] for d in range(10)]
    path = write_text(tmp_path / "ww.txt", docs)
    src = pretraining_source([path], tok, seq_len=40, seed=0)
    z = tok.token_to_id("##z")
    n_partial = 0
    for whole_word in (True, False):
        for start in range(0, 400, 50):
            indices = list(range(start, start + 50))
            examples = [src[i] for i in indices]
            batch = collate_pretraining(examples, indices, tok, seed=0, whole_word=whole_word)
            S = batch["input_ids"].shape[1]
            masked = set(batch["masked_positions"].tolist())
            for b, ex in enumerate(examples):
                for k, i in enumerate(ex.input_ids):
                    # "d..t.." + "##z": one word of two pieces (unless truncation cut the
                    # word's head off: then "##z" opens a segment)
                    if i == z and ex.words[k - 1] != -1:
                        assert ex.words[k] == ex.words[k - 1]
                        split = ((b * S + k) in masked) != ((b * S + k - 1) in masked)
                        if whole_word:
                            assert not split
                        n_partial += split
            # Examples without words given derive them from "##" pieces: the same masks.
            bare = [Example(e.input_ids, e.token_type_ids, e.label) for e in examples]
            again = collate_pretraining(bare, indices, tok, seed=0, whole_word=whole_word)
            assert torch.equal(again["masked_positions"], batch["masked_positions"])
    assert n_partial > 0  # token-level masking does split words


# --------------------------------------------------------------------------- batch layout

@settings(max_examples=60, deadline=None)
@given(step=st.integers(0, 50), b=st.integers(1, 6), accum=st.integers(1, 4),
       world=st.integers(1, 4))
def test_batch_indices_cover_the_step_for_any_world_size(step: int, b: int, accum: int,
                                                         world: int) -> None:
    G = b * accum * world
    batches = [batch_indices(step, m, b, accum, r, world)
               for m in range(accum) for r in range(world)]
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(step * G, (step + 1) * G))  # disjoint and covering
    assert all(len(batch) == b for batch in batches)
    # One rank at world*b covers, per micro-step, exactly what all ranks cover together.
    for m in range(accum):
        single = batch_indices(step, m, world * b, accum, 0, 1)
        together = [i for r in range(world) for i in batch_indices(step, m, b, accum, r, world)]
        assert sorted(together) == single


def test_batch_indices_two_ranks_match_one_rank_at_double_batch() -> None:
    for step in range(3):
        two = batch_indices(step, 0, 4, 2, 0, 2) + batch_indices(step, 1, 4, 2, 0, 2) + \
            batch_indices(step, 0, 4, 2, 1, 2) + batch_indices(step, 1, 4, 2, 1, 2)
        one = batch_indices(step, 0, 8, 2, 0, 1) + batch_indices(step, 1, 8, 2, 0, 1)
        assert set(two) == set(one) == set(range(step * 16, step * 16 + 16))
    # G = 3*2*2 = 12; step 2 starts at 24; micro-step 1 of rank 1 is slot 1*2+1 = 3
    assert batch_indices(2, 1, 3, 2, 1, 2) == [24 + 9, 24 + 10, 24 + 11]
    with pytest.raises(ValueError, match="rank=2"):
        batch_indices(0, 0, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="micro_step=3"):
        batch_indices(0, 3, 4, 3, 0, 1)


# ------------------------------------------------------------------------ embedded corpus

@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedded_corpus(tmp_path_factory.mktemp("embedded"), max_bytes=400_000)


def test_embedded_corpus_is_english_docstrings(embedded: Path) -> None:
    text = embedded.read_text(encoding="utf-8")
    assert embedded.name == "corpus.txt" and 300_000 < len(text.encode()) <= 400_000
    docs = list(read_documents(embedded))
    assert len(docs) > 500
    words = Counter(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    for common in ("the", "return", "of", "is", "a", "to", "and", "if", "file", "object"):
        assert words[common] > 50, common
    assert ">>>" not in text and "\n\n\n" not in text
    assert "Return" in text  # capitalisation is kept; the tokenizer decides
    assert all(line == line.strip() for line in text.splitlines())


def test_embedded_corpus_is_deterministic(embedded: Path, tmp_path: Path) -> None:
    small = embedded_corpus(tmp_path / "again", max_bytes=100_000).read_text(encoding="utf-8")
    full = embedded.read_text(encoding="utf-8")
    # Documents are added in a fixed order until the budget: the smaller one is a prefix.
    assert len(small) > 80_000 and full.startswith(small)


def test_embedded_corpus_imports_no_module(embedded: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from bertrt.train.corpus import embedded_corpus
        before = set(sys.modules)
        t = time.perf_counter()
        path = embedded_corpus(Path({str(tmp_path)!r}), max_bytes=10**9)  # the whole stdlib
        print("seconds", time.perf_counter() - t, file=sys.stderr)
        # text codecs (encodings.*) load on demand for any open(); they are not the sources read
        new = sorted(m for m in set(sys.modules) - before if not m.startswith("encodings."))
        print("NEW", new)
        print("SIZE", path.stat().st_size)
    """)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "NEW []" in proc.stdout, proc.stdout
    assert "Beautiful is better than ugly" not in proc.stdout  # `this` was not imported
    whole = (tmp_path / "corpus.txt").read_text(encoding="utf-8")
    assert whole.startswith(embedded.read_text(encoding="utf-8"))  # same in another process
