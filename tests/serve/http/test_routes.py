"""Every route against an independent reference: `InferenceEngine`'s own calls on the same
model (and sentence-transformers on MiniLM), the tokenizer, and the shapes TEI and OpenAI
clients read."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from bertrt.serve import InferenceEngine, TruncatedWarning


def assert_close(got: object, want: object, tol: float = 1e-5) -> None:
    """JSON values equal, their floats within `tol` (a batch of one sequence may run on
    another graph than a batch of many: the engine's padded twin of a packed export)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=tol)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want)
        for key in want:
            assert_close(got[key], want[key], tol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w, tol)
    else:
        assert got == want


def test_embed_equals_engine_embed_in_order_and_one_vector_per_input(encoder, client_of, texts):
    expected = encoder.embed(texts, normalize=True)
    with client_of(encoder) as client:
        batch = client.post("/embed", json={"inputs": texts})
        one = client.post("/embed", json={"inputs": texts[3]})
        raw = client.post("/embed", json={"inputs": texts, "normalize": False})
    assert batch.status_code == 200
    got = np.array(batch.json(), dtype=np.float32)
    assert got.shape == (len(texts), encoder.hidden_size)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.array(one.json()).shape == (1, encoder.hidden_size)  # TEI: always [[float]]
    np.testing.assert_allclose(one.json()[0], expected[3], atol=1e-6)
    np.testing.assert_allclose(np.array(raw.json()), encoder.embed(texts, normalize=False),
                               atol=1e-5)


@pytest.mark.parametrize("streams", [1, 2])
def test_embed_on_minilm_equals_engine_and_sentence_transformers(minilm_dir, client_of,
                                                                 streams):
    # streams=2: a request of several inputs runs as batches on the single-thread session,
    # two at once
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "", "The quick brown fox jumps over the dog.",
             "Ünïcödé, accents and CJK 中文 too!", " ".join(["on and on"] * 100)]  # > 256
    with InferenceEngine(minilm_dir, backend="ort", threads=2, streams=streams) as engine:
        assert engine.streams == streams and (engine.backend.narrow is None) == (streams == 1)
        with pytest.warns(TruncatedWarning):
            expected = engine.embed(texts)
        with client_of(engine, max_client_batch=8) as client:
            response = client.post("/embed", json={"inputs": texts, "truncate": True})
            openai = client.post("/v1/embeddings", json={"input": texts[:2]})
            too_long = client.post("/embed", json={"inputs": texts[-1]})
            assert client.get("/info").json()["streams"] == streams
    assert response.status_code == 200, response.text
    got = np.array(response.json(), dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(
        texts, convert_to_numpy=True, normalize_embeddings=True)
    assert float(np.abs(got - reference).max()) < 1e-5
    assert float((got * reference).sum(1).min()) > 1 - 1e-5
    data = openai.json()["data"]
    np.testing.assert_allclose([d["embedding"] for d in data], expected[:2], atol=1e-6)
    assert too_long.status_code == 413 and too_long.json()["error_type"] == "input_too_long"
    assert "256" in too_long.json()["error"]


def test_openai_embeddings_shape_usage_and_base64(encoder, client_of, tokenizer, texts):
    texts = texts[:3]
    expected = encoder.embed(texts, normalize=True)
    with client_of(encoder) as client:
        floats = client.post("/v1/embeddings", json={"input": texts, "model": "tiny"}).json()
        packed = client.post("/v1/embeddings", json={"input": texts,
                                                     "encoding_format": "base64"}).json()
        single = client.post("/v1/embeddings", json={"input": texts[0]}).json()
    assert floats["object"] == "list" and floats["model"] == "tiny"
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]
    assert {d["object"] for d in floats["data"]} == {"embedding"}
    np.testing.assert_allclose([d["embedding"] for d in floats["data"]], expected, atol=1e-6)
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
               for d in packed["data"]]
    np.testing.assert_array_equal(decoded, np.array([d["embedding"] for d in floats["data"]],
                                                    dtype=np.float32))
    tokens = sum(len(ids) for ids in tokenizer(texts, padding=False)["input_ids"])
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert len(single["data"]) == 1


def test_predict_single_pair_and_batch_equal_engine_predict(classifier, client_of, texts):
    pairs = ["dog", "the cat sat"]
    with client_of(classifier) as client:
        one = client.post("/predict", json={"inputs": texts[0]}).json()
        pair = client.post("/predict", json={"inputs": [texts[0], pairs[0]]}).json()
        batch = client.post("/predict", json={"inputs": [[t] for t in texts]}).json()
        mixed = client.post("/predict", json={"inputs": [[texts[0], pairs[0]], [texts[1]],
                                                         [texts[3], pairs[1]]]}).json()
        raw = client.post("/predict", json={"inputs": [[t] for t in texts],
                                            "raw_scores": True}).json()
    expected = classifier.predict(texts, raw_scores=True)
    assert len({e["label"] for e in expected}) > 1  # the fixture's labels vary by text
    for got, want in zip(batch, expected):
        assert [g["label"] for g in got][0] == want["label"]  # best first
        assert got[0]["score"] == pytest.approx(want["score"], abs=1e-6)
        assert sorted(g["label"] for g in got) == ["negative", "neutral", "positive"]
        assert sum(g["score"] for g in got) == pytest.approx(1.0)
        scores = [g["score"] for g in got]
        assert scores == sorted(scores, reverse=True)
    assert_close(one, batch[0])  # a single input: one flat list, as TEI answers
    labels = classifier.labels
    for got, want in zip(raw, expected):
        by_label = {g["label"]: g["score"] for g in got}
        np.testing.assert_allclose([by_label[labels[k]] for k in range(3)], want["logits"],
                                   atol=1e-5)
    want_pairs = classifier.predict([texts[0], texts[3]], pairs)
    assert pair[0]["label"] == want_pairs[0]["label"]
    assert pair[0]["score"] == pytest.approx(want_pairs[0]["score"], abs=1e-6)
    assert_close(mixed[0], pair)
    assert_close(mixed[1], batch[1])
    assert mixed[2][0]["score"] == pytest.approx(want_pairs[1]["score"], abs=1e-6)


def test_tag_equals_engine_tag_with_character_offsets(tagger, client_of):
    texts = ["mary visited paris and john smith lives in new york.", "Mary  SMITH", "dog"]
    with client_of(tagger) as client:
        batch = client.post("/tag", json={"inputs": texts}).json()
        one = client.post("/tag", json={"inputs": texts[0]}).json()
    assert_close(batch, tagger.tag(texts))
    assert_close(one, batch[0])
    assert [(e["entity"], e["text"]) for e in one] == [
        ("PER", "mary"), ("LOC", "paris"), ("PER", "john smith"), ("LOC", "new york")]
    for text, found in zip(texts, batch):
        assert all(text[e["start"]:e["end"]] == e["text"] for e in found)
    assert batch[1][0]["text"] == "Mary  SMITH"  # offsets into the text as sent


def test_tokenize_gives_ids_and_offsets_of_the_tokenizer(encoder, client_of, tokenizer):
    texts = ["the cat, sat", "Mary cats"]
    with client_of(encoder) as client:
        with_special = client.post("/tokenize", json={"inputs": texts}).json()
        without = client.post("/tokenize", json={"inputs": texts[0],
                                                 "add_special_tokens": False}).json()
    ids = tokenizer(texts, padding=False)["input_ids"]
    for text, tokens, want in zip(texts, with_special, ids):
        assert [t["id"] for t in tokens] == want.tolist()
        assert tokens[0] == {"id": tokenizer.cls_id, "special": True, "text": "[CLS]",
                             "start": None, "stop": None}
        assert tokens[-1]["text"] == "[SEP]" and tokens[-1]["special"]
        for t in tokens[1:-1]:
            assert not t["special"] and text[t["start"]:t["stop"]] == t["text"]
    # offsets into the text as sent; "##s" is the text's "s"
    assert [t["text"] for t in with_special[1][1:-1]] == ["Mary", "cat", "s"]
    assert without == [with_special[0][1:-1]]


def test_health_and_info_describe_the_model_and_limits(encoder, client_of, max_length):
    with client_of(encoder, max_client_batch=7, max_wait_ms=1.5, max_concurrent=9) as client:
        health = client.get("/health")
        info = client.get("/info").json()
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert info["head"] == "none" and info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert info["hidden_size"] == encoder.config.hidden_size == 128
    assert info["max_input_length"] == max_length
    assert (info["backend"], info["precision"], info["packed"]) == ("ort", "fp32", True)
    assert info["max_client_batch_size"] == 7 and info["max_concurrent_requests"] == 9
    assert info["max_wait_ms"] == 1.5 and info["max_batch_tokens"] == encoder.max_batch_tokens
    assert info["routes"] == ["/embed", "/v1/embeddings", "/tokenize"]


def test_timing_headers_and_token_counts(encoder, client_of, tokenizer, texts):
    with client_of(encoder) as client:
        response = client.post("/embed", json={"inputs": texts[:2]})
    headers = response.headers
    tokens = sum(len(ids) for ids in tokenizer(texts[:2], padding=False)["input_ids"])
    assert int(headers["x-compute-tokens"]) == tokens
    assert int(headers["x-compute-characters"]) == len(texts[0]) + len(texts[1])
    times = {k: float(headers[f"x-{k}-time"]) for k in ("tokenization", "queue", "inference",
                                                         "total")}
    assert times["inference"] > 0
    assert times["total"] >= times["queue"] + times["inference"]


def _metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{selector}}}" if selector else "")) + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    assert found, f"{name} {labels} not in /metrics"
    return float(found.group(1))


def test_metrics_count_requests_by_route_and_status_and_batches(encoder, client_of, texts):
    with client_of(encoder) as client:
        for _ in range(3):
            client.post("/embed", json={"inputs": texts})
        client.post("/embed", json={"inputs": []})
        client.post("/tokenize", json={"inputs": "dog"})
        text = client.get("/metrics").text
    assert _metric(text, "bertrt_requests_total", route="/embed", status="200") == 3
    assert _metric(text, "bertrt_requests_total", route="/embed", status="400") == 1
    assert _metric(text, "bertrt_requests_total", route="/tokenize", status="200") == 1
    assert _metric(text, "bertrt_batch_size_count") >= 3
    assert _metric(text, "bertrt_batch_size_sum") == 3 * len(texts)  # every sequence, once
    assert _metric(text, "bertrt_batch_tokens_sum") == _metric(text, "bertrt_input_tokens_total")
    assert _metric(text, "bertrt_batch_positions_sum") == _metric(text, "bertrt_batch_tokens_sum")
    for stage, count in (("tokenize", 4), ("queue", 3), ("inference", 3), ("total", 4)):
        assert _metric(text, "bertrt_request_stage_duration_seconds_count", stage=stage) == count
    assert _metric(text, "bertrt_queue_size") == 0
    assert _metric(text, "bertrt_requests_in_flight") == 0


def test_a_padded_engine_counts_positions_and_gives_the_same_vectors(encoder_dir, encoder,
                                                                     client_of, texts):
    with InferenceEngine(encoder_dir, backend="ort", packed=False, threads=1) as padded, \
            client_of(padded) as client:
        response = client.post("/embed", json={"inputs": texts})
        text = client.get("/metrics").text
    np.testing.assert_allclose(np.array(response.json()), encoder.embed(texts, normalize=True),
                               atol=1e-5)
    longest = max(len(ids) for ids in padded.tokenizer(texts, padding=False)["input_ids"])
    assert _metric(text, "bertrt_batch_positions_sum") == len(texts) * longest
