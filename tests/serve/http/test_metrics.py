"""The server's metrics: updates recorded on any thread are applied once each, and a read of
the registry sees every update recorded before it."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("prometheus_client")

from bertrt.serve.http.metrics import ServerMetrics  # noqa: E402


def test_updates_recorded_on_many_threads_while_flushing_are_applied_once_each():
    metrics = ServerMetrics()
    per_thread, threads = 2000, 4
    done = threading.Event()

    def record(k: int) -> None:
        for i in range(per_thread):
            metrics.request("/embed", 200 if i % 2 else 413)
            metrics.observe_stages(total=0.001 * k)

    def flush_meanwhile() -> None:
        while not done.is_set():
            metrics.flush()

    flusher = threading.Thread(target=flush_meanwhile)
    flusher.start()
    workers = [threading.Thread(target=record, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    flusher.join()
    get = metrics.registry.get_sample_value  # a read: flushes what is left first
    half = per_thread * threads / 2
    assert get("bertrt_requests_total", {"route": "/embed", "status": "200"}) == half
    assert get("bertrt_requests_total", {"route": "/embed", "status": "413"}) == half
    assert get("bertrt_request_stage_duration_seconds_count", {"stage": "total"}) == 2 * half


def test_a_scrape_sees_what_was_recorded_before_it_and_the_gauges_read_live():
    metrics = ServerMetrics()
    state = {"in_flight": 3, "queued": 7}
    metrics.watch(in_flight=lambda: state["in_flight"], queued=lambda: state["queued"])
    metrics.observe_batch(sequences=4, tokens=90, positions=90, seconds=0.02, budget=150)
    metrics.tokenized(tokens=90, truncated=1)
    metrics.dropped_sequences(2)
    text = metrics.exposition().decode()
    assert "bertrt_batch_size_count 1.0" in text
    assert "bertrt_batch_tokens_sum 90.0" in text
    assert "bertrt_batch_budget_positions 150.0" in text
    assert "bertrt_input_tokens_total 90.0" in text
    assert "bertrt_truncated_inputs_total 1.0" in text
    assert "bertrt_dropped_sequences_total 2.0" in text
    assert "bertrt_requests_in_flight 3.0" in text
    assert "bertrt_queue_size 7.0" in text
    state["in_flight"] = 0
    assert "bertrt_requests_in_flight 0.0" in metrics.exposition().decode()
