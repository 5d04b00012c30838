"""InferenceEngine: texts in, embeddings / labels / entities out, in input order.

Reference numbers come from sentence-transformers and transformers on the same weights (the
real MiniLM checkpoint for embeddings, tiny random classifiers for labels); entity spans from
a tiny tagger whose weights make each token's label a lookup (see `tagger_dir`). Tiny models
and few texts keep the module within seconds on 2 cores, apart from MiniLM's ONNX export.
"""

from __future__ import annotations

import json
import string
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bertrt import BertConfig, Model, Tokenizer
from bertrt.errors import BertrtError
from bertrt.serve import (
    InferenceEngine,
    OrtBackend,
    PackedOutputs,
    PaddedOutputs,
    TruncatedWarning,
    token_budget_batches,
)
from bertrt.serve.workload import Request

WORDS = ["the", "cat", "sat", "on", "an", "mat", "and", "dog", "ran", "far", "away", ".", ",",
         "john", "smith", "lives", "in", "new", "york", "mary", "##ann", "visited", "paris",
         "city", "##ing"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(string.ascii_lowercase)
         + [f"##{c}" for c in string.ascii_lowercase])
TEXTS = ["the cat sat on an mat.", "dog", "", "a dog ran far away, and the cat sat.",
         "   ", "new york", "mary visited paris and john smith lives in new york."]
#: The tagger's label of each word (all other tokens: O).
TAGS = {"john": "B-PER", "smith": "I-PER", "mary": "B-PER", "##ann": "I-LOC",
        "new": "B-LOC", "york": "I-LOC", "paris": "B-LOC", "city": "I-LOC"}
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def tiny_config(**overrides: object) -> BertConfig:
    return BertConfig.preset("tiny", vocab_size=len(VOCAB), max_position_embeddings=32,
                             **overrides)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(VOCAB)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    model = Model.from_config(tiny_config(), seed=0, tokenizer=tokenizer)
    return model.save(tmp_path_factory.mktemp("encoder") / "model")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    config = tiny_config().with_labels(["negative", "positive", "neutral"])
    model = Model.from_config(config, head="classification", seed=3, tokenizer=tokenizer)
    with torch.no_grad():  # logits of W (pooled - their mean): labels that vary by text
        enc = {k: torch.from_numpy(v) for k, v in tokenizer(TEXTS).items()}
        pooled = model.to_torch()(**enc)["pooler_output"]
        weight = model.weights["classifier.weight"]
        weight.mul_(40.0)
        model.weights["classifier.bias"].copy_(-weight @ pooled.mean(0))
    return model.save(tmp_path_factory.mktemp("classifier") / "model")


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A tagger whose every token's label is `TAGS`' lookup: the layers' output projections
    are zero, so each LayerNorm passes its input on and the final hidden state is
    LayerNorm(word embedding); the word embedding of a token with label k is one-hot at k, and
    the classifier row k is one-hot at k (scaled), so label k wins."""
    config = tiny_config(num_hidden_layers=1).with_labels(LABELS)
    model = Model.from_config(config, head="token-classification", seed=0, tokenizer=tokenizer)
    vocab = tokenizer.vocab
    with torch.no_grad():
        for name, tensor in model.weights.items():
            if (name.endswith(("output.dense.weight", "output.dense.bias"))
                    or "position_embeddings" in name or "token_type_embeddings" in name):
                tensor.zero_()
        table = model.weights["bert.embeddings.word_embeddings.weight"]
        table.zero_()
        for token, i in vocab.items():
            table[i, LABELS.index(TAGS.get(token, "O"))] = 1.0
        classifier = model.weights["classifier.weight"]
        classifier.zero_()
        classifier[:, : len(LABELS)] = 20.0 * torch.eye(len(LABELS))
        model.weights["classifier.bias"].zero_()
    return model.save(tmp_path_factory.mktemp("tagger") / "model")


@pytest.fixture(scope="module")
def encoder(encoder_dir: Path) -> InferenceEngine:
    """The padded ONNX Runtime engine (packed ones are checked against it)."""
    with InferenceEngine(encoder_dir, backend="ort", packed=False, threads=2) as engine:
        yield engine


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------------- MiniLM embeddings
MINILM_TEXTS = ["A man is eating food.", "", "   ", "The quick brown fox jumps over the dog.",
                "Ünïcödé, accents and CJK 中文 too!",
                " ".join(["a long text that goes on and on"] * 60)]  # over 256 tokens


def hf_mean_pooled(model_dir: Path, texts: list[str], max_length: int) -> np.ndarray:
    """What sentence-transformers computes for MiniLM's config, by hand: BertModel, mean over
    the mask, L2-normalized."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    net = transformers.AutoModel.from_pretrained(model_dir).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length,
              return_tensors="pt")
    with torch.no_grad():
        hidden = net(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    return st.encode(MINILM_TEXTS, convert_to_numpy=True, batch_size=4)


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_minilm_embeddings_equal_sentence_transformers(backend, minilm_dir, minilm_reference):
    # each CPU runtime's default path (packed); the others against it: test_packed_and_int8
    with InferenceEngine(minilm_dir, backend=backend, threads=2,
                         max_batch_tokens=200) as engine:
        assert engine.packed and engine.backend_name == backend
        assert (engine.defaults.pooling, engine.defaults.normalize) == ("mean", True)
        assert engine.max_length == 256  # sentence_bert_config.json's max_seq_length
        with pytest.warns(TruncatedWarning, match="1 of 6 texts"):
            ours = engine.embed(MINILM_TEXTS)
        assert engine.stats.batches > 1
    assert ours.shape == (6, 384) and ours.dtype == np.float32
    assert cosine(ours, minilm_reference).min() >= 1 - 1e-5
    assert np.abs(ours - minilm_reference).max() < 1e-5
    by_hand = hf_mean_pooled(minilm_dir, MINILM_TEXTS, 256)
    assert cosine(ours, by_hand).min() >= 1 - 1e-5
    np.testing.assert_allclose(ours[1], ours[2], atol=1e-6)  # "" and "   ": [CLS] [SEP]


# ---------------------------------------------------------------------- batching and order
def test_token_budget_batches():
    lengths = np.array([9, 7, 5, 5, 3, 2, 2])
    padded = token_budget_batches(lengths, 12)
    assert [(s.start, s.stop) for s in padded] == [(0, 1), (1, 2), (2, 4), (4, 7)]
    for s in padded:
        part = lengths[s]
        assert len(part) == 1 or len(part) * part.max() <= 12
    packed = token_budget_batches(lengths, 12, packed=True)
    assert [(s.start, s.stop) for s in packed] == [(0, 1), (1, 3), (3, 7)]
    assert [(s.start, s.stop) for s in token_budget_batches(np.array([40, 3]), 10)] == [
        (0, 1), (1, 2)]  # over the budget: alone
    assert token_budget_batches(np.array([], dtype=np.int64), 10) == []


def random_texts(n: int, seed: int, longest: int = 20) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[:12], size=int(k))) for k in rng.integers(0, longest, n)]


def test_order_kept_and_budget_respected(encoder, monkeypatch):
    texts = random_texts(40, seed=1)
    alone = np.stack([encoder.embed([t])[0] for t in texts])
    shapes: list[tuple[int, int]] = []
    run = encoder.backend.run_sequences

    def recording(requests, pad_id=0):
        shapes.append((len(requests), max(r.length for r in requests)))
        return run(requests, pad_id)

    monkeypatch.setattr(encoder.backend, "run_sequences", recording)
    monkeypatch.setattr(encoder, "max_batch_tokens", 48)
    together = encoder.embed(texts)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert len(shapes) > 4 and all(b * s <= 48 for b, s in shapes)
    assert sum(b for b, _ in shapes) == len(texts)
    assert encoder.stats.positions == sum(b * s for b, s in shapes)
    perm = np.random.default_rng(2).permutation(len(texts))
    np.testing.assert_allclose(encoder.embed([texts[i] for i in perm]), together[perm],
                               atol=1e-5)
    shapes.clear()
    monkeypatch.setattr(encoder, "max_batch_tokens", 5)  # below every text's length
    encoder.embed(texts[:6])
    assert [b for b, _ in shapes] == [1] * 6


def test_empty_whitespace_and_over_long_texts(encoder_dir, encoder):
    assert encoder.embed([]).shape == (0, encoder.hidden_size)
    blank = encoder.embed(["", "   ", "\n\t "])
    np.testing.assert_allclose(blank, np.repeat(blank[:1], 3, axis=0), atol=1e-6)
    words = (WORDS[:12] * 4)[:40]  # each a single token
    with InferenceEngine(encoder_dir, backend="torch", max_length=16) as short:
        with pytest.warns(TruncatedWarning, match="2 of 3 texts were longer than 16") as rec:
            got = short.embed([" ".join(words), "cat", " ".join(words[:20])])
        assert len(rec) == 1 and short.stats.truncated == 2
        # [CLS] + 14 words + [SEP]
        np.testing.assert_allclose(got[0], short.embed(" ".join(words[:14]))[0], atol=1e-5)
        np.testing.assert_allclose(got[2], got[0], atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            short.embed(["cat"])  # nothing truncated, nothing said


def test_poolings_and_normalize(encoder_dir, encoder, tokenizer):
    texts = ["the cat sat", "dog", ""]
    model = Model.load(encoder_dir)
    enc = tokenizer(texts)
    with torch.no_grad():
        hidden = model.to_torch()(**{k: torch.from_numpy(v) for k, v in enc.items()}
                                  )["last_hidden_state"].numpy()
    mask = enc["attention_mask"][..., None].astype(bool)
    expected = {"cls": hidden[:, 0], "mean": (hidden * mask).sum(1) / mask.sum(1),
                "max": np.where(mask, hidden, -np.inf).max(1)}
    assert (encoder.defaults.pooling, encoder.defaults.normalize) == ("cls", False)
    np.testing.assert_allclose(encoder.embed(texts), expected["cls"], atol=1e-5)
    for mode, want in expected.items():
        np.testing.assert_allclose(encoder.embed(texts, pooling=mode), want, atol=1e-5)
    unit = encoder.embed(texts, pooling="mean", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    assert cosine(unit, expected["mean"]).min() > 1 - 1e-6
    with pytest.raises(BertrtError, match="pooling 'sum' is unknown"):
        encoder.embed(texts, pooling="sum")


def test_packed_and_int8_backends_agree_with_padded(encoder_dir, encoder, monkeypatch):
    texts = random_texts(30, seed=4) + ["", " "]
    padded = {mode: encoder.embed(texts, pooling=mode) for mode in ("cls", "mean", "max")}
    for backend in ("ort", "torch"):
        with InferenceEngine(encoder_dir, backend=backend, packed=True,
                             max_batch_tokens=64) as engine:
            assert engine.packed and "packed batches" in engine.description
            for mode, want in padded.items():
                np.testing.assert_allclose(engine.embed(texts, pooling=mode), want, atol=1e-5)
            stats = engine.stats
            assert stats.positions == stats.tokens <= 64 * stats.batches  # real tokens only
    with InferenceEngine(encoder_dir, backend="ort", precision="int8") as engine:
        assert engine.packed and engine.precision == "int8"
        assert cosine(engine.embed(texts, pooling="mean"), padded["mean"]).min() > 0.999
    with pytest.raises(BertrtError, match="precision int8 runs on backend ort, not on torch"):
        InferenceEngine(encoder_dir, backend="torch", precision="int8")


def test_backends_return_only_what_the_engine_reads(encoder_dir, classifier_dir):
    """An encoder's engine never runs the pooler (ONNX Runtime prunes what no output asked
    for needs); a classifier's keeps its logits; both keep the hidden states embed pools."""
    from bertrt.serve.workload import Request

    one = [Request(np.array([2, 5, 6, 3]), np.zeros(4, np.int64))]
    two = one + [Request(np.array([2, 7, 3]), np.zeros(3, np.int64))]
    for backend in ("ort", "torch"):
        with InferenceEngine(encoder_dir, backend=backend, packed=backend == "ort") as engine:
            assert "pooler_output" in engine.backend.output_names
            for batch in (one, two):  # the padded twin (one sequence) and the packed model
                assert engine.backend.run_sequences(batch).names == ["last_hidden_state"]
    with InferenceEngine(classifier_dir, backend="ort") as engine:
        assert sorted(engine.backend.run_sequences(two).names) == ["last_hidden_state",
                                                                   "logits"]
        with pytest.raises(BertrtError, match="has none of the outputs"):
            engine.backend.read_only(["pooler"])


def _stops_spinning(backend) -> bool:
    options = backend.session.get_session_options()
    try:
        return options.get_session_config_entry("session.force_spinning_stop") == "1"
    except RuntimeError:  # not set
        return False


def test_yield_cores_stops_spinning_after_each_run(encoder_dir):
    """The server's engine: ONNX Runtime's threads spin between a run's ops only (both the
    packed model and its padded twin); a lone caller's engine leaves ONNX Runtime's default;
    with streams, the wide sessions (lone queries on idle cores) keep the default too."""
    with InferenceEngine(encoder_dir, backend="ort", yield_cores=True) as engine:
        assert _stops_spinning(engine.backend) and _stops_spinning(engine.backend.single)
    with InferenceEngine(encoder_dir, backend="ort", packed=False, yield_cores=True,
                         streams=2) as engine:  # padded: no streams, so it yields
        assert engine.streams == 1 and _stops_spinning(engine.backend)
    with InferenceEngine(encoder_dir, backend="ort") as engine:
        assert not _stops_spinning(engine.backend)
        assert not _stops_spinning(engine.backend.single)
    with InferenceEngine(encoder_dir, backend="ort", threads=2, yield_cores=True,
                         streams=2) as engine:
        assert engine.streams == 2
        assert not _stops_spinning(engine.backend)
        assert not _stops_spinning(engine.backend.single)


def test_cpu_sessions_run_skip_layer_norm_as_layer_normalization(encoder_dir, tmp_path,
                                                                 monkeypatch):
    """The ort flavour writes SKIP_LAYER_NORM as Add + LayerNormalization (ONNX Runtime's CPU
    runs it faster than its SkipLayerNormalization); on (B, S, H) ONNX Runtime would fuse
    it back, and an `OrtBackend`'s session does not let it. What ONNX Runtime runs is read
    from the optimized model it writes; without the option it fuses (so this test sees the
    difference), and the outputs agree either way."""
    import onnxruntime as ort

    real = ort.InferenceSession
    written: list[Path] = []

    def keeping_the_optimized_model(path: str, options: ort.SessionOptions, **kwargs: object):
        written.append(tmp_path / f"optimized{len(written)}.onnx")
        options.optimized_model_filepath = str(written[-1])
        return real(path, options, **kwargs)

    def ops_run() -> Counter[str]:
        return Counter(n.op_type for n in onnx.load(str(written[-1])).graph.node)

    monkeypatch.setattr(ort, "InferenceSession", keeping_the_optimized_model)
    layers = tiny_config().num_hidden_layers
    enc = Tokenizer(VOCAB)(TEXTS[:4], padding=False)
    requests = [Request(np.array(i), np.array(t))
                for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
    outputs = []
    for packed in (False, True):
        path = Model.load(encoder_dir).export_onnx(tmp_path / f"m{packed}.onnx", packed=packed)
        backend = OrtBackend(path, threads=1)
        assert ops_run()["SkipLayerNormalization"] == 0
        assert ops_run()["LayerNormalization"] == 2 * layers + packed  # + the embeddings'
        outputs.append(backend.run_sequences(requests).pool("last_hidden_state", "mean"))
    with monkeypatch.context() as patch:
        patch.setattr(OrtBackend, "disabled_optimizers", ())
        fused = OrtBackend(tmp_path / "mFalse.onnx", threads=1)
        assert ops_run()["SkipLayerNormalization"] == 2 * layers
        np.testing.assert_allclose(fused.run_sequences(requests).pool(
            "last_hidden_state", "mean"), outputs[0], atol=1e-5)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


def test_streams_load_a_single_thread_session_of_the_same_export(encoder_dir, tmp_path):
    """`streams` > 1 on packed ONNX Runtime: a narrow session of one intra-op thread, on the
    model dir's export and on an .onnx file, giving what the backend gives; elsewhere one
    stream."""
    with InferenceEngine(encoder_dir, backend="ort", threads=2, streams=2,
                         yield_cores=True) as engine:
        narrow = engine.backend.narrow
        assert engine.streams == 2 and narrow is not None and narrow.packed
        options = narrow.session.get_session_options()
        assert options.intra_op_num_threads == 1  # no pool: nothing to spin or stop
        assert narrow.fetched == engine.backend.fetched  # the pooler dropped there too
        enc = engine.tokenizer(["the cat sat", "a dog ran far away"], padding=False)
        requests = [Request(np.array(i), np.array(t))
                    for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
        np.testing.assert_allclose(
            narrow.run_sequences(requests).pool("last_hidden_state", "mean"),
            engine.backend.run_sequences(requests).pool("last_hidden_state", "mean"),
            atol=1e-6)
    path = Model.load(encoder_dir).export_onnx(tmp_path / "m.onnx", packed=True)
    with InferenceEngine(path, backend="ort", streams=3, vocab=encoder_dir) as engine:
        assert engine.streams == 3 and engine.backend.narrow is not None
    with InferenceEngine(encoder_dir, backend="ort", streams=1) as engine:
        assert engine.streams == 1 and engine.backend.narrow is None
    with InferenceEngine(encoder_dir, backend="ort", packed=False, streams=2) as engine:
        assert engine.streams == 1  # padded: one batch at a time
    with pytest.raises(BertrtError, match="streams"):
        InferenceEngine(encoder_dir, backend="ort", streams=0)


def test_auto_times_the_probe_batch_as_a_loaded_server_runs_it(encoder_dir):
    """With streams, `time_backend` runs the probe batch on the narrow session from that many
    threads at once, every sequence once; the query on the backend itself."""
    import threading

    from bertrt.serve.selection import probe_requests, time_backend

    with InferenceEngine(encoder_dir, backend="ort", threads=2, streams=2) as engine:
        batch, query = probe_requests(engine.config.vocab_size, 5, engine.max_length)
        calls: list[tuple[str, int, int]] = []
        for name, backend in (("wide", engine.backend), ("narrow", engine.backend.narrow)):
            run = backend.run_sequences

            def recorded(requests, pad_id=0, _run=run, _name=name):
                calls.append((_name, threading.get_ident(), len(requests)))
                return _run(requests, pad_id)

            backend.run_sequences = recorded
        time_backend(engine.backend, batch, query, 0, streams=2)
    narrow = [c for c in calls if c[0] == "narrow"]
    wide = [c for c in calls if c[0] == "wide"]
    assert len({c[1] for c in narrow}) >= 2  # two threads at once
    repeats = len(wide)  # one query a run: the untimed one and each repeat
    assert sum(c[2] for c in narrow) == repeats * len(batch)
    assert all(c[2] == 1 for c in wide)


def test_padded_and_packed_outputs_pool_alike():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 1, 5])
    hidden = rng.standard_normal((3, 5, 4)).astype(np.float32)
    hidden[0, 3:] = np.nan  # what a runtime leaves past a sequence's end must not leak
    padded = PaddedOutputs.from_batch({"h": hidden, "pooled": hidden[:, 0]}, lengths)
    packed = PackedOutputs({"h": np.concatenate([hidden[b, :n] for b, n in enumerate(lengths)])},
                           {"pooled": hidden[:, 0]}, np.array([0, 3, 4, 9]))
    for mode in ("cls", "mean", "max"):
        np.testing.assert_allclose(padded.pool("h", mode), packed.pool("h", mode), rtol=1e-6)
    np.testing.assert_array_equal(padded.tokens("h", 2), packed.tokens("h", 2))
    np.testing.assert_array_equal(padded.sequences("pooled"), packed.sequences("pooled"))
    with pytest.raises(BertrtError, match="no per-sequence output 'logits'"):
        packed.sequences("logits")
    # a batch without padding (every length = the width, as a single query) pools unmasked
    full = PaddedOutputs.from_batch({"h": hidden[2:]}, lengths[2:])
    for mode in ("cls", "mean", "max"):
        np.testing.assert_allclose(full.pool("h", mode), padded.pool("h", mode)[2:], rtol=1e-6)
    np.testing.assert_allclose(full.pool("h", "mean")[0], hidden[2].astype(np.float64).mean(0),
                               rtol=1e-6)


# ---------------------------------------------------------------------- predict and tag
@pytest.mark.parametrize("backend,packed", [("ort", None), ("ort", False), ("torch", True),
                                            ("openvino", None), ("openvino", False)])
def test_predict_matches_transformers(backend, packed, classifier_dir):
    import transformers

    texts = TEXTS + random_texts(10, seed=5, longest=8)
    pairs = texts[1:] + texts[:1]
    tok = transformers.BertTokenizer.from_pretrained(classifier_dir)
    net = transformers.BertForSequenceClassification.from_pretrained(classifier_dir).eval()
    with InferenceEngine(classifier_dir, backend=backend, packed=packed, threads=2,
                         max_batch_tokens=64) as engine:
        assert engine.packed is (packed is not False)
        for second in (None, pairs):
            got = engine.predict(texts, second, raw_scores=True)
            enc = tok(texts, second, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = net(**enc).logits.numpy()
            probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
            assert [g["label"] for g in got] == [net.config.id2label[i]
                                                 for i in logits.argmax(1)]
            np.testing.assert_allclose([g["score"] for g in got], probs.max(1), atol=1e-5)
            np.testing.assert_allclose([g["logits"] for g in got], logits, atol=1e-4)
        assert set(engine.predict(["cat"])[0]) == {"label", "score"}
        assert len({g["label"] for g in engine.predict(texts)}) > 1


def test_tag_spans(tagger_dir):
    text = "John Smith lives in New York, Maryann visited Pàris city.  mary john"
    with InferenceEngine(tagger_dir, backend="ort", max_batch_tokens=40) as engine:
        found = engine.tag([text, "", "the cat", "city"])
        with InferenceEngine(tagger_dir, backend="torch") as other:
            again = other.tag([text])[0]
    spans = [(e["entity"], e["start"], e["end"], e["text"]) for e in found[0]]
    assert [(e["entity"], e["start"], e["end"], e["text"]) for e in again] == spans
    assert spans == [("PER", 0, 10, "John Smith"), ("LOC", 20, 28, "New York"),
                     ("PER", 30, 37, "Maryann"),  # "##ann" is I-LOC, but the word is mary's
                     ("LOC", 46, 56, "Pàris city"),  # accent stripped, offsets in the input
                     ("PER", 59, 63, "mary"), ("PER", 64, 68, "john")]  # B B: two entities
    assert all(0.99 < e["score"] <= 1.0 for e in found[0])
    assert found[1:] == [[], [], [{"entity": "LOC", "start": 0, "end": 4, "text": "city",
                                   "score": pytest.approx(found[0][3]["score"])}]]


def test_calls_the_head_does_not_support(encoder, classifier_dir, tagger_dir):
    with pytest.raises(BertrtError, match=r"predict\(\) needs a sequence classifier; .* is an "
                                          r"encoder without a task head .*use embed\(\)"):
        encoder.predict(["cat"])
    with pytest.raises(BertrtError, match=r"tag\(\) needs a token classifier.*use embed"):
        encoder.tag(["cat"])
    with InferenceEngine(tagger_dir, backend="torch") as engine:
        with pytest.raises(BertrtError, match=r"is a token classifier.*use tag\(\)"):
            engine.predict(["cat"])
        assert engine.embed(["cat"]).shape == (1, 128)  # every head has hidden states
    with InferenceEngine(classifier_dir, backend="torch") as engine:
        with pytest.raises(BertrtError, match=r"is a sequence classifier.*use predict\(\)"):
            engine.tag(["cat"])
        with pytest.raises(BertrtError, match="got 2 texts but 1 pairs"):
            engine.predict(["a", "b"], ["c"])


# ---------------------------------------------------------------------- models and options
def test_onnx_file_with_its_vocabulary(encoder_dir, encoder, tmp_path):
    texts = ["the cat sat", "dog ran"]
    path = Model.load(encoder_dir).export_onnx(tmp_path / "encoder.onnx")
    with pytest.raises(BertrtError, match="no tokenizer beside it; give vocab="):
        InferenceEngine(path)
    want = encoder.embed(texts)
    for vocab in (encoder_dir, encoder_dir / "vocab.txt", Tokenizer(VOCAB)):
        with InferenceEngine(path, vocab=vocab) as engine:
            assert engine.head == "none" and engine.max_length == 32
            np.testing.assert_allclose(engine.embed(texts), want, atol=1e-6)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(VOCAB[:-1] + ["##zz"]) + "\n")
    with pytest.raises(BertrtError, match="not the one it was exported with"):
        InferenceEngine(path, vocab=other)
    with pytest.raises(BertrtError, match="backend torch needs the model's weights"):
        InferenceEngine(path, backend="torch", vocab=encoder_dir)
    with pytest.raises(BertrtError, match="a padded export, but packed=True was asked for"):
        InferenceEngine(path, vocab=encoder_dir, packed=True)
    model = Model.load(encoder_dir)
    packed = model.export_onnx(tmp_path / "packed.onnx", packed=True)
    with InferenceEngine(packed, vocab=encoder_dir) as engine:
        assert engine.packed
        np.testing.assert_allclose(engine.embed(texts), want, atol=1e-5)
    int8 = model.export_onnx(tmp_path / "int8.onnx", flavour="standard", int8=True)
    with pytest.raises(BertrtError, match=r"an int8 export, but precision fp32 was asked for "
                                          r"\(pass precision='int8'\)"):
        InferenceEngine(int8, vocab=encoder_dir)
    with InferenceEngine(int8, vocab=encoder_dir, precision="int8") as engine:
        assert not engine.packed
        assert cosine(engine.embed(texts), want).min() > 0.999


def test_a_model_object_and_a_pretraining_head(tokenizer):
    model = Model.from_config(tiny_config(), head="pretraining", seed=0, tokenizer=tokenizer)
    with InferenceEngine(model, backend="torch") as engine:
        torch_out = engine.embed(TEXTS, pooling="mean")
    with InferenceEngine(model, backend="ort") as engine:
        assert "Model (pretraining head)" in engine.description
        assert engine.max_batch_tokens == OrtBackend.batch_tokens == 512  # the CPU default
        np.testing.assert_allclose(engine.embed(TEXTS, pooling="mean"), torch_out, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(backend="tensorrt"), "backend 'tensorrt' is unknown; expected one of auto, ort"),
    (dict(backend="ort", precision="bf16"), "precision bf16 runs on backend openvino, not on "
                                            "ort"),
    (dict(backend="torch", precision="fp16"), "precision fp16 runs on backend ort-cuda, not "
                                              "on torch"),
    (dict(precision="fp64"), "precision 'fp64' is unknown"),
    (dict(threads=0), "threads: expected an integer of at least 1, got 0"),
    (dict(max_batch_tokens=0), "max_batch_tokens: expected an integer of at least 1"),
    (dict(max_length=33), "max_length 33 exceeds the model's max_position_embeddings=32"),
    (dict(vocab="vocab.txt"), "vocab= is for an .onnx file"),
])
def test_bad_options(kwargs, message, encoder_dir):
    with pytest.raises(BertrtError, match=message):
        InferenceEngine(encoder_dir, **kwargs)


def test_bad_models_and_texts(encoder, tmp_path):
    with pytest.raises(BertrtError, match="no such file or directory"):
        InferenceEngine(tmp_path / "missing")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(BertrtError, match="not a readable ONNX model"):
        InferenceEngine(tmp_path / "bad.onnx")
    with pytest.raises(BertrtError, match=r"texts\[1\]: expected a str, got int"):
        encoder.embed(["cat", 3])
    with pytest.raises(BertrtError, match="texts: expected a list of strings, got NoneType"):
        encoder.embed(None)
    bad = ["cat"] * 5000 + ["dog \ud800"]  # in the second tokenizer chunk
    with pytest.raises(BertrtError, match=r"texts\[5000\]: character 4 is a lone surrogate"):
        encoder.embed(bad)


# ---------------------------------------------------------------------- the CLI
def cli(*args: object, stdin: str | None = None):
    from click.testing import CliRunner

    from bertrt.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], input=stdin)


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def texts_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("".join(f"{t}\n" for t in TEXTS), encoding="utf-8")
    return path


def test_cli_embed_round_trips(encoder_dir, encoder, texts_file, tmp_path):
    want = encoder.embed(TEXTS, pooling="mean", normalize=True)
    common = ("--pooling", "mean", "--normalize", "--threads", "2", "--batch-tokens", "64")
    result = cli("embed", encoder_dir, "--texts", texts_file, "-o", tmp_path / "out.npy",
                 "--padded", "--precision", "fp32", *common)
    assert result.exit_code == 0, result.output
    assert f"embedded {len(TEXTS)} texts" in result.stderr
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (len(TEXTS), 128) and got.dtype == np.float32  # "" and "   " kept
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert cli("embed", encoder_dir, "--texts", texts_file, "-o", tmp_path / "out.jsonl",
               *common).exit_code == 0  # packed, by default
    rows = [json.loads(ln) for ln in (tmp_path / "out.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows], np.float32), got,
                               atol=1e-5)
    piped = cli("embed", encoder_dir, "--texts", "-", *common,
                stdin=texts_file.read_text().replace("\n", "\r\n"))
    assert piped.exit_code == 0, piped.output
    assert [json.loads(ln) for ln in piped.stdout.splitlines()] == rows


def test_cli_predict_labels_and_entities(classifier_dir, tagger_dir, texts_file, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{t}\n" for t in TEXTS[1:] + TEXTS[:1]))
    with InferenceEngine(classifier_dir, backend="torch") as engine:
        want = engine.predict(TEXTS, TEXTS[1:] + TEXTS[:1])
    result = cli("predict", classifier_dir, "--texts", texts_file, "--pairs", pairs, "-o",
                 tmp_path / "labels.jsonl")
    assert result.exit_code == 0, result.output
    got = [json.loads(ln) for ln in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want],
                               atol=1e-5)
    tagged = cli("predict", tagger_dir, "--texts", "-", "--backend", "torch", "--packed",
                 stdin="John Smith lives in New York\n\nthe cat\n")
    assert tagged.exit_code == 0, tagged.output
    rows = [json.loads(ln) for ln in tagged.stdout.splitlines()]
    assert [[(e["entity"], e["text"]) for e in r["entities"]] for r in rows] == [
        [("PER", "John Smith"), ("LOC", "New York")], [], []]


@pytest.mark.parametrize("args,message", [
    (["embed", "{missing}", "--texts", "{texts}"], "no such file or directory"),
    (["embed", "{encoder}", "--texts", "{missing}"], "--texts {missing}: no such file"),
    (["embed", "{encoder}", "--texts", "{latin1}"], "line 2: invalid UTF-8 (byte "),
    (["embed", "{encoder}", "--texts", "{texts}", "-o", "{tmp}/out.csv"],
     "expected a file ending in .npy or .jsonl"),
    (["embed", "{encoder}", "--texts", "{texts}", "-o", "{tmp}/no/out.npy"],
     "folder {tmp}/no does not exist"),
    (["embed", "{encoder}", "--texts", "{texts}", "--backend", "onnx"],
     "backend 'onnx' is unknown"),
    (["embed", "{encoder}", "--texts", "{texts}", "--backend", "ort", "--precision", "fp16"],
     "precision fp16 runs on backend ort-cuda, not on ort"),
    (["embed", "{encoder}", "--texts", "{texts}", "--batch-tokens", "0"],
     "max_batch_tokens: expected an integer of at least 1"),
    (["embed", "{encoder}", "--texts", "{texts}", "--pooling", "sum"], "pooling 'sum'"),
    (["predict", "{encoder}", "--texts", "{texts}", "--backend", "torch"],
     r"predict() needs a sequence classifier"),
    (["predict", "{classifier}", "--texts", "{texts}", "--pairs", "{latin1}"],
     "--pairs {latin1}: line 2: invalid UTF-8"),
    (["predict", "{classifier}", "--texts", "{texts}", "--pairs", "{one}"],
     "--pairs {one}: 1 lines, but --texts has 7"),
    (["predict", "{tagger}", "--texts", "{one}", "--pairs", "{one}", "--backend", "torch"],
     "--pairs: {tagger} is a token classifier"),
    (["predict", "{classifier}", "--texts", "{texts}", "-o", "{tmp}/out.npy"],
     "expected a file ending in .jsonl"),
])
def test_cli_errors(args, message, encoder_dir, classifier_dir, tagger_dir, texts_file,
                    tmp_path):
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
    (tmp_path / "one.txt").write_text("cat\n")
    names = dict(missing=tmp_path / "missing", texts=texts_file, encoder=encoder_dir,
                 classifier=classifier_dir, tagger=tagger_dir, tmp=tmp_path,
                 latin1=tmp_path / "latin1.txt", one=tmp_path / "one.txt")
    line = error_line(cli(*[a.format(**names) for a in args]))
    assert message.format(**names) in line


def test_a_single_sequence_runs_on_the_padded_twin(encoder_dir, encoder):
    with InferenceEngine(encoder_dir, backend="ort", packed=True, threads=1) as engine:
        twin = engine.backend.single
        assert engine.packed and twin is not None and not twin.packed
        sizes = []
        run = twin.run_sequences

        def spy(requests, pad_id=0):
            sizes.append(len(requests))
            return run(requests, pad_id)

        twin.run_sequences = spy
        alone = engine.embed(TEXTS[:1], pooling="mean")
        together = engine.embed(TEXTS[:2], pooling="mean")
        assert sizes == [1]  # the batch of two ran packed
        np.testing.assert_allclose(alone[0], together[0], atol=1e-5)
        np.testing.assert_allclose(alone, encoder.embed(TEXTS[:1], pooling="mean"), atol=1e-5)
    with InferenceEngine(encoder_dir, backend="ort", packed=True,
                         padded_single=False) as engine:
        assert engine.backend.single is None
