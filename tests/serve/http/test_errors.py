"""Every refusal: a 4xx with one line of JSON `{"error", "error_type"}`, never a 500, and the
server answers the next request as before."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bertrt.serve import TruncatedWarning

#: (route, body, status, error_type, words the message must hold)
BAD_REQUESTS = [
    ("/embed", b'{"inputs": ["a", ', 400, "invalid_json", ["not valid JSON"]),
    ("/embed", b"", 400, "invalid_json", ["not valid JSON"]),
    ("/embed", b'\xff\xfe{"inputs": "a"}', 400, "invalid_json", ["not valid JSON"]),
    ("/embed", b'["a", "b"]', 422, "validation", ["JSON object", "a list"]),
    ("/embed", b'{"input": "a"}', 422, "validation", ["missing field 'inputs'"]),
    ("/embed", b'{"inputs": 3}', 422, "validation", ["inputs", "a number"]),
    ("/embed", b'{"inputs": ["a", null]}', 422, "validation", ["inputs[1]", "null"]),
    ("/embed", b'{"inputs": "a", "normalize": "yes"}', 422, "validation", ["normalize"]),
    ("/embed", b'{"inputs": "a", "truncate": 1}', 422, "validation", ["truncate"]),
    # a lone surrogate escape is no Unicode text: the JSON parser refuses it
    ("/embed", b'{"inputs": "\\ud800 lone"}', 400, "invalid_json", ["surrogate"]),
    ("/embed", b'{"inputs": []}', 400, "empty", ["empty batch"]),
    ("/embed", json.dumps({"inputs": ["a"] * 5}).encode(), 413, "batch_too_large",
     ["5 inputs", "limit of 4", "--max-client-batch"]),
    ("/embed", json.dumps({"inputs": ["dog " * 40]}).encode(), 413, "input_too_long",
     ["inputs[0]", "42 tokens", "maximum of 32", "truncate"]),
    ("/tag", json.dumps({"inputs": ["dog", "dog " * 40]}).encode(), 404, "not_supported",
     ["/tag needs a token classifier", "encoder without a task head", "/embed"]),
    ("/predict", b'{"inputs": "dog"}', 404, "not_supported",
     ["/predict needs a sequence classifier", "none head"]),
    ("/v1/embeddings", b'{"input": "a", "encoding_format": "int8"}', 422, "validation",
     ["encoding_format"]),
    ("/v1/embeddings", b'{"input": [[1, 2]]}', 422, "validation", ["input[0]", "a list"]),
    ("/v1/embeddings", b'{"input": "a", "dimensions": 7}', 422, "validation", ["dimensions"]),
    ("/v1/embeddings", b'{"input": []}', 400, "empty", ["empty batch"]),
    ("/tokenize", b'{"inputs": [1]}', 422, "validation", ["inputs[0]"]),
    ("/embed", b"x" * 2001, 413, "payload_too_large", ["2000 bytes", "--payload-limit"]),
]


def _check_error(response, status: int, error_type: str, words: list[str]) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "\n" not in response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == error_type
    for word in words:
        assert word in body["error"]


@pytest.fixture(scope="module")
def client(encoder, client_of):
    with client_of(encoder, max_client_batch=4, payload_limit=2000) as client:
        yield client


@pytest.mark.parametrize("route, body, status, error_type, words", BAD_REQUESTS,
                         ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_one_json_line_and_the_server_goes_on(client, encoder, route, body,
                                                                status, error_type, words):
    response = client.post(route, content=body, headers={"content-type": "application/json"})
    _check_error(response, status, error_type, words)
    after = client.post("/embed", json={"inputs": ["dog"]})
    assert after.status_code == 200
    np.testing.assert_allclose(after.json(), encoder.embed(["dog"], normalize=True), atol=1e-6)


def test_a_body_over_the_limit_is_refused_without_a_declared_length(client):
    def chunks():  # chunked transfer: no content-length to check up front
        for _ in range(30):
            yield b" " * 100

    response = client.post("/embed", content=chunks())
    _check_error(response, 413, "payload_too_large", ["2000 bytes"])


def test_predict_refuses_what_is_not_a_text_a_pair_or_a_batch(classifier, client_of):
    bad = [({"inputs": ["a", "b", "c"]}, "inputs: expected a string, a pair"),
           ({"inputs": ["a"]}, "inputs: expected a string, a pair"),
           ({"inputs": [["a", "b", "c"]]}, "inputs[0]"),
           ({"inputs": [["a"], "b"]}, "inputs: expected"),
           ({"inputs": [[]]}, "inputs[0]"),
           ({"inputs": "a", "raw_scores": "no"}, "raw_scores")]
    with client_of(classifier) as client:
        for body, words in bad:
            _check_error(client.post("/predict", json=body), 422, "validation", [words])
        _check_error(client.post("/predict", json={"inputs": []}), 400, "empty", ["empty"])
        _check_error(client.post("/tag", json={"inputs": "a"}), 404, "not_supported",
                     ["this model is a sequence classifier", "/predict"])
        assert client.post("/predict", json={"inputs": [["a"], ["b", "c"]]}).status_code == 200


def test_truncate_and_auto_truncate_let_a_long_input_through(encoder, client_of):
    long = "dog " * 40
    with pytest.warns(TruncatedWarning):  # the engine truncates, and warns
        expected = encoder.embed([long], normalize=True)
    with client_of(encoder) as client:
        refused = client.post("/embed", json={"inputs": long})
        asked = client.post("/embed", json={"inputs": long, "truncate": True})
    with client_of(encoder, auto_truncate=True) as client:
        auto = client.post("/embed", json={"inputs": long})
        metrics = client.get("/metrics").text
        overridden = client.post("/embed", json={"inputs": long, "truncate": False})
    assert refused.status_code == 413
    np.testing.assert_allclose(asked.json(), expected, atol=1e-6)
    np.testing.assert_allclose(auto.json(), expected, atol=1e-6)
    assert int(auto.headers["x-compute-tokens"]) == 32
    assert "bertrt_truncated_inputs_total 1.0" in metrics
    assert overridden.status_code == 413


def test_unknown_routes_and_methods_are_json_too(client):
    _check_error(client.get("/nowhere"), 404, "not_found", ["/nowhere", "/info"])
    _check_error(client.get("/embed"), 405, "method_not_allowed", ["GET /embed"])
    _check_error(client.post("/health"), 405, "method_not_allowed", ["POST /health"])
    assert client.get("/embed").headers["allow"] == "POST"
    assert client.post("/info").headers["allow"] == "GET, HEAD"


def test_head_asks_for_the_headers_of_a_get_route(client):
    got, head = client.get("/health"), client.head("/health")
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))


def test_an_engine_failure_is_a_500_of_the_same_shape_and_the_server_goes_on(encoder,
                                                                             client_of):
    from starlette.testclient import TestClient

    from bertrt.serve.http.app import Server

    server = Server(encoder)
    calls = []
    run = server.service.run

    def flaky(requests):
        calls.append(len(requests))
        if len(calls) == 1:
            raise RuntimeError("the runtime fell over")
        return run(requests)

    server.service.run = flaky
    with TestClient(server, raise_server_exceptions=False) as client:
        failed = client.post("/embed", json={"inputs": ["dog"]})
        after = client.post("/embed", json={"inputs": ["dog"]})
    _check_error(failed, 500, "internal", ["/embed", "RuntimeError", "fell over"])
    assert after.status_code == 200


def test_an_app_whose_lifespan_has_not_started_answers_503(encoder):
    import asyncio

    import httpx

    from bertrt.serve.http import create_app

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(encoder))  # runs no lifespan
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.get("/health"),
                    await client.post("/embed", json={"inputs": "dog"}),
                    await client.post("/tokenize", json={"inputs": "dog"})]

    for response in asyncio.run(calls()):
        _check_error(response, 503, "unavailable", ["not running"])
