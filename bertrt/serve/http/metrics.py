"""The server's Prometheus metrics, in a registry of its own (no global state).

`GET /metrics` serves `ServerMetrics.exposition()`: request counts by route and status, the
requests in flight and the sequences queued, batch sizes, real tokens and computed positions
per batch, and per-stage durations (tokenize, queue, inference, total).

A request's updates are recorded, not applied: each is a tuple appended to a queue (a few
hundred nanoseconds), and `flush` applies them in bulk to the Prometheus objects, which
lock, search buckets and look labels up. The server flushes every second off any request's
path, and every read of the registry (a scrape) flushes first, so what it serves is whole.
Applied one by one on the request's path, the same updates cost a lone request ~0.15 ms
after its model run (the run leaves the core's caches cold, and each update misses in them).
The requests in flight and the sequences queued are read when scraped (`watch`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.registry import Collector

#: Buckets of the duration histograms, seconds: 0.5 ms to 10 s.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
#: Buckets of the sequences-per-batch histogram.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Buckets of the tokens- and positions-per-batch histograms.
TOKEN_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Every metric of one server."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        #: Recorded updates: (the method that applies one, its arguments).
        self._pending: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._flushing = threading.Lock()
        registry.register(_Flusher(self))  # first: a read of the registry flushes first
        self.requests = Counter("bertrt_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.in_flight = Gauge("bertrt_requests_in_flight",
                               "Requests accepted and not yet answered", registry=registry)
        self.queue_size = Gauge("bertrt_queue_size", "Sequences waiting for a batch",
                                registry=registry)
        self.dropped = Counter("bertrt_dropped_sequences",
                               "Queued sequences dropped uncomputed: their client went away",
                               registry=registry)
        self.input_tokens = Counter("bertrt_input_tokens", "Tokens of the inputs tokenized",
                                    registry=registry)
        self.truncated = Counter("bertrt_truncated_inputs",
                                 "Inputs truncated to the model's maximum length",
                                 registry=registry)
        self.batch_size = Histogram("bertrt_batch_size", "Sequences per batch",
                                    buckets=SIZE_BUCKETS, registry=registry)
        self.batch_tokens = Histogram("bertrt_batch_tokens", "Real tokens per batch",
                                      buckets=TOKEN_BUCKETS, registry=registry)
        self.batch_positions = Histogram(
            "bertrt_batch_positions",
            "Positions computed per batch (its real tokens when packed, size x longest when "
            "padded)", buckets=TOKEN_BUCKETS, registry=registry)
        self.batch_seconds = Histogram("bertrt_batch_duration_seconds",
                                       "Seconds the engine ran a batch",
                                       buckets=DURATION_BUCKETS, registry=registry)
        self.batch_budget = Gauge(
            "bertrt_batch_budget_positions",
            "Positions the next batch may cost: --max-batch-tokens, or what the engine runs in "
            "--max-batch-ms at its recent speed", registry=registry)
        self.stage_seconds = Histogram(
            "bertrt_request_stage_duration_seconds",
            "Per-request seconds by stage: tokenize, queue (waiting for a batch), inference "
            "(the batches that ran it), total", ["stage"], buckets=DURATION_BUCKETS,
            registry=registry)

    def watch(self, in_flight: Callable[[], float], queued: Callable[[], float]) -> None:
        """Read the requests in flight and the sequences queued from these when scraped."""
        self.in_flight.set_function(in_flight)
        self.queue_size.set_function(queued)

    # ------------------------------------------------------------------ recorded (any thread)
    def request(self, route: str, status: int) -> None:
        """A request answered."""
        self._pending.append((self._request, (route, status)))

    def tokenized(self, tokens: int, truncated: int) -> None:
        """A request's inputs tokenized: their tokens, and how many were truncated."""
        self._pending.append((self._tokenized, (tokens, truncated)))

    def dropped_sequences(self, count: int) -> None:
        """Queued sequences dropped uncomputed (their client went away)."""
        self._pending.append((self.dropped.inc, (count,)))

    def observe_batch(self, sequences: int, tokens: int, positions: int,
                      seconds: float, budget: int) -> None:
        """A batch ran: its sequences, real tokens, positions computed, seconds, and the
        budget of the next."""
        self._pending.append((self._batch, (sequences, tokens, positions, seconds, budget)))

    def observe_stages(self, **seconds: float) -> None:
        """A request's seconds by stage (tokenize, queue, inference, total)."""
        self._pending.append((self._stages, (seconds,)))

    # ------------------------------------------------------------------ applied
    def flush(self) -> None:
        """Apply every recorded update to the Prometheus objects."""
        pending = self._pending
        with self._flushing:
            while pending:
                apply, args = pending.popleft()
                apply(*args)

    def _request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def _tokenized(self, tokens: int, truncated: int) -> None:
        self.input_tokens.inc(tokens)
        self.truncated.inc(truncated)

    def _batch(self, sequences: int, tokens: int, positions: int, seconds: float,
               budget: int) -> None:
        self.batch_size.observe(sequences)
        self.batch_tokens.observe(tokens)
        self.batch_positions.observe(positions)
        self.batch_seconds.observe(seconds)
        self.batch_budget.set(budget)

    def _stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage).observe(value)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class _Flusher(Collector):
    """Registered first in a `ServerMetrics` registry: collecting it flushes the updates
    recorded since the last flush, before the metrics they update are collected."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        self.metrics.flush()
        return iter(())
