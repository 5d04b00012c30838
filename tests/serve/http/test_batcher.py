"""The batcher: batches cut by a budget of real tokens (or padded positions) and a count,
formed from what waits whenever the engine is free, a max-wait timer, cancelled requests
dropped before they run, failures confined to their batch. A fake engine records what it ran;
an event holds it busy."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from bertrt.serve.http.batcher import Batcher, Job, Pace, batch_cut
from bertrt.serve.http.metrics import ServerMetrics
from bertrt.serve.outputs import PackedOutputs
from bertrt.serve.workload import Request


def test_batch_cut_counts_real_tokens_packed_and_the_rectangle_padded():
    lengths = [5, 3, 8, 2, 9]
    assert batch_cut(lengths, 16, None, packed=True) == 3    # 5+3+8 = 16
    assert batch_cut(lengths, 15, None, packed=True) == 2
    assert batch_cut(lengths, 16, None, packed=False) == 2   # 3 x 8 = 24 > 16
    assert batch_cut(lengths, 100, 4, packed=True) == 4      # the count limit
    assert batch_cut([40, 1], 16, None, packed=True) == 1    # over the budget: alone
    assert batch_cut([], 16, None, packed=True) == 0


def test_pace_converges_to_the_budget_that_runs_in_the_target_time():
    # an engine costing 2 ms a run plus 0.15 ms a position: a 40 ms batch holds
    # (40 - 2) / 0.15 = 253 positions, reached from a batch far too small or too large
    def seconds(positions: int) -> float:
        return (2 + 0.15 * positions) / 1000

    for start in (4, 2048):
        pace = Pace(0.040, floor=1, decay=0.5)
        assert pace.budget(cap=2048) == 2048  # nothing ran yet: the cap
        budget = start
        for _ in range(40):  # every batch fills the budget (a long queue)
            pace.observe(budget, seconds(budget))
            budget = pace.budget(cap=2048)
        assert abs(budget - 253) <= 2, (start, budget)
    # the cap and the floor bound it
    pace = Pace(0.040, floor=64)
    pace.observe(10, 1.0)      # one very slow batch
    assert pace.budget(cap=2048) == 64
    assert pace.budget(cap=32) == 32
    pace = Pace(0.040)
    pace.observe(1000, 0.001)  # a very fast engine
    assert pace.budget(cap=512) == 512


def test_max_batch_ms_cuts_batches_to_what_the_engine_runs_in_that_time():
    # 0.25 ms a position (at least: sleep overshoots), a 20 ms target: at most 80 positions a
    # batch once one ran, however large max_batch_tokens is
    ran: list[int] = []

    def run(requests: list[Request]) -> PackedOutputs:
        tokens = sum(r.length for r in requests)
        ran.append(tokens)
        time.sleep(0.00025 * tokens)
        ids = np.concatenate([r.input_ids for r in requests]).astype(np.float32)[:, None]
        cu = np.concatenate([[0], np.cumsum([r.length for r in requests])])
        return PackedOutputs({"last_hidden_state": ids}, {}, cu)

    metrics = ServerMetrics()
    batcher = Batcher(run, packed=True, max_batch_tokens=1000, max_batch_ms=20,
                      metrics=metrics)
    run_jobs(batcher, [[request(4, 0)]])  # one batch ran: the engine's speed is known
    jobs = run_jobs(batcher, [[request(4, i)] for i in range(100)])
    batcher.close()
    assert all(job.error is None for job in jobs)
    assert sum(ran) == 404
    assert max(ran) <= 80, ran   # without the target, one batch could take all 400
    assert len(ran) >= 6
    gauge = metrics.registry.get_sample_value("bertrt_batch_budget_positions")
    assert gauge == batcher.budget and 64 <= batcher.budget <= 80


def request(length: int, first: int = 0) -> Request:
    return Request(np.arange(first, first + length, dtype=np.int64),
                   np.zeros(length, dtype=np.int64))


class FakeEngine:
    """Runs a packed batch: each token's hidden state is its id (H = 1); records the batches;
    blocks while `hold` is clear."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.running = threading.Event()

    def __call__(self, requests: list[Request]) -> PackedOutputs:
        self.batches.append([int(r.input_ids[0]) for r in requests])
        self.running.set()
        self.hold.wait(10)
        ids = np.concatenate([r.input_ids for r in requests]).astype(np.float32)[:, None]
        cu = np.concatenate([[0], np.cumsum([r.length for r in requests])])
        return PackedOutputs({"last_hidden_state": ids}, {}, cu)


def mean_ids(view, rows):
    return list(view.pooled("mean")[rows, 0])


def run_jobs(batcher: Batcher, jobs_requests: list[list[Request]]) -> list[Job]:
    """Submit each list as one job; wait for all."""
    finished = threading.Semaphore(0)
    jobs = [Job(reqs, mean_ids, lambda job: finished.release()) for reqs in jobs_requests]
    for job in jobs:
        batcher.submit(job)
    for _ in jobs:
        assert finished.acquire(timeout=10)
    return jobs


def test_what_waits_while_the_engine_runs_is_cut_by_the_budget_oldest_first():
    engine = FakeEngine()
    batcher = Batcher(engine, packed=True, max_batch_tokens=10)
    engine.hold.clear()
    first = Job([request(4, 100)], mean_ids, lambda job: None)
    batcher.submit(first)
    assert engine.running.wait(5)  # the engine is busy with the first job alone
    # queued meanwhile: 6 + 4 fit 10; 3 does not join them; a 12-token one runs alone
    lengths = [6, 4, 3, 12, 2]
    finished = threading.Semaphore(0)
    jobs = [Job([request(n, 10 * (i + 1))], mean_ids, lambda job: finished.release())
            for i, n in enumerate(lengths)]
    for job in jobs:
        batcher.submit(job)
    engine.hold.set()
    for _ in jobs:
        assert finished.acquire(timeout=10)
    batcher.close()
    assert engine.batches == [[100], [10, 20], [30], [40], [50]]
    for job, n, i in zip(jobs, lengths, range(1, 6)):
        assert job.results == [pytest.approx(10 * i + (n - 1) / 2)]  # its own rows' mean
        assert job.error is None and job.batches == 1


def test_a_padded_budget_counts_size_times_longest_and_a_count_limit_holds():
    engine = FakeEngine()
    batcher = Batcher(engine, packed=False, max_batch_tokens=12, max_batch_requests=2)
    engine.hold.clear()
    batcher.submit(Job([request(1, 100)], mean_ids, lambda job: None))
    assert engine.running.wait(5)
    engine.hold.set()
    # 2 x 6 = 12 fits; then 3 x 4 = 12 would fit the budget but the count stops at 2
    run_jobs(batcher, [[request(6, 10)], [request(2, 20)], [request(4, 30)], [request(1, 40)],
                       [request(1, 50)]])
    batcher.close()
    assert engine.batches[1:] in ([[10, 20], [30, 40], [50]], [[10], [20, 30], [40, 50]])


def test_a_request_of_many_inputs_is_split_across_batches_and_reassembled():
    engine = FakeEngine()
    batcher = Batcher(engine, packed=True, max_batch_tokens=8)
    [job] = run_jobs(batcher, [[request(5, 10), request(5, 20), request(3, 30), request(1, 40)]])
    batcher.close()
    assert engine.batches == [[10], [20, 30], [40]]
    assert job.results == pytest.approx([12, 22, 31, 40])
    assert job.batches == 3
    assert job.inference_s > 0 and job.queue_s >= 0


def test_max_wait_gathers_requests_that_arrive_within_it():
    engine = FakeEngine()
    batcher = Batcher(engine, packed=True, max_batch_tokens=100, max_wait_ms=300)
    start = time.perf_counter()
    finished = threading.Semaphore(0)
    jobs = []
    for i in range(3):
        job = Job([request(2, 10 * (i + 1))], mean_ids, lambda job: finished.release())
        jobs.append(job)
        batcher.submit(job)
        time.sleep(0.05)
    for _ in jobs:
        assert finished.acquire(timeout=10)
    waited = time.perf_counter() - start
    batcher.close()
    assert engine.batches == [[10, 20, 30]]  # one batch, not three
    assert 0.25 < waited < 2.0
    assert jobs[0].queue_s == pytest.approx(0.3, abs=0.1)


def test_a_full_batch_does_not_wait_for_the_timer():
    engine = FakeEngine()
    batcher = Batcher(engine, packed=True, max_batch_tokens=4, max_wait_ms=5000)
    start = time.perf_counter()
    run_jobs(batcher, [[request(2, 10)], [request(2, 20)]])  # 2 + 2 fill the budget
    elapsed = time.perf_counter() - start
    finished = threading.Semaphore(0)
    batcher.submit(Job([request(2, 30)], mean_ids, lambda job: finished.release()))
    assert not finished.acquire(timeout=0.2)  # alone, not full: it waits for its timer
    batcher.close()  # closing runs it at once
    assert finished.acquire(timeout=1)
    assert engine.batches == [[10, 20], [30]]
    assert elapsed < 2


def test_cancelled_requests_are_dropped_before_they_are_computed():
    engine = FakeEngine()
    batcher = Batcher(engine, packed=True, max_batch_tokens=100)
    engine.hold.clear()
    batcher.submit(Job([request(1, 100)], mean_ids, lambda job: None))
    assert engine.running.wait(5)
    done: list[Job] = []
    gone = Job([request(3, 10), request(3, 11)], mean_ids, done.append)
    kept = Job([request(3, 20)], mean_ids, done.append)
    batcher.submit(gone)
    batcher.submit(kept)
    batcher.cancel(gone)
    engine.hold.set()
    batcher.close()
    assert engine.batches == [[100], [20]]
    assert done == [kept]


def test_a_failing_batch_fails_its_jobs_only():
    calls = []

    def run(requests):
        calls.append(len(requests))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return FakeEngine()(requests)

    batcher = Batcher(run, packed=True, max_batch_tokens=3)
    bad, good = run_jobs(batcher, [[request(2, 1)], [request(2, 2)]])
    batcher.close()
    assert isinstance(bad.error, RuntimeError) and good.error is None
    assert good.results == [pytest.approx(2.5)]


def test_close_runs_what_is_queued_and_then_refuses():
    from bertrt.serve.http.errors import HttpError

    engine = FakeEngine()
    batcher = Batcher(engine, packed=True, max_batch_tokens=100, max_wait_ms=10_000)
    done: list[Job] = []
    batcher.submit(Job([request(2, 10)], mean_ids, done.append))
    batcher.close()  # does not wait out the timer
    assert len(done) == 1 and engine.batches == [[10]]
    with pytest.raises(HttpError) as refused:
        batcher.submit(Job([request(2, 10)], mean_ids, done.append))
    assert refused.value.status == 503


async def asgi_post(app, body: dict, disconnect: asyncio.Event | None = None,
                    path: str = "/embed") -> list[dict]:
    """POST `body` to the ASGI `app` on this event loop (no socket); the messages it sent. The
    client disconnects once `disconnect` is set (None: it waits a minute)."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(),
                 "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if disconnect is not None:
            await disconnect.wait()
            return {"type": "http.disconnect"}
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return sent


def test_a_client_that_goes_away_while_queued_is_not_computed(encoder):
    """Raw ASGI: the engine is held busy by a first request; a second request's client
    disconnects while it waits; only the first one's sequences ever run."""
    from bertrt.serve.http.app import Server

    server = Server(encoder)
    ran: list[int] = []
    busy, release = threading.Event(), threading.Event()
    run = server.service.run

    def held(requests):
        ran.append(len(requests))
        busy.set()
        release.wait(10)
        return run(requests)

    server.service.run = held

    async def scenario() -> tuple[list[dict], list[dict]]:
        async with server.lifespan():
            leave = asyncio.Event()
            first = asyncio.create_task(asgi_post(server, {"inputs": ["dog"]}))
            await asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)
            second = asyncio.create_task(asgi_post(server, {"inputs": ["the cat", "sat"]},
                                                   leave))
            while server.batcher.queued < 2:  # tokenized and queued
                await asyncio.sleep(0.01)
            leave.set()
            gone = await second
            release.set()
            return await first, gone

    first, gone = asyncio.run(scenario())
    assert first[0]["status"] == 200
    assert gone[0]["status"] == 499
    assert ran == [1]  # the second request's two sequences never ran
    assert "bertrt_dropped_sequences_total 2.0" in server.metrics.exposition().decode()


def test_streams_run_batches_at_once_under_load_and_a_lone_request_on_every_core():
    # `narrow` runs on one core (several at once), `wide` on all of them (alone): record who
    # ran beside whom
    lock = threading.Lock()
    active = {"wide": 0, "narrow": 0}
    seen: list[tuple[str, int, int, int]] = []  # kind, wide and narrow running, sequences

    def runner(kind: str):
        def run(requests: list[Request]) -> PackedOutputs:
            with lock:
                active[kind] += 1
                seen.append((kind, active["wide"], active["narrow"], len(requests)))
            time.sleep(0.05)
            with lock:
                active[kind] -= 1
            ids = np.concatenate([r.input_ids for r in requests]).astype(np.float32)[:, None]
            cu = np.concatenate([[0], np.cumsum([r.length for r in requests])])
            return PackedOutputs({"last_hidden_state": ids}, {}, cu)
        return run

    batcher = Batcher(runner("wide"), packed=True, max_batch_tokens=1000,
                      narrow=runner("narrow"), streams=2)
    lone = run_jobs(batcher, [[request(4, 7)]])
    assert seen == [("wide", 1, 0, 1)] and lone[0].results == [pytest.approx(8.5)]
    # a burst of two-sequence requests: the waiting work split between the two streams
    burst = [[request(3, 100 * i), request(5, 100 * i + 50)] for i in range(40)]
    jobs = run_jobs(batcher, burst)
    batcher.close()
    for i, job in enumerate(jobs):  # each job's rows, in order, whichever stream ran them
        assert job.error is None
        assert job.results == [pytest.approx(100 * i + 1), pytest.approx(100 * i + 52)]
    narrow = [s for s in seen if s[0] == "narrow"]
    assert narrow and max(s[2] for s in narrow) == 2, seen  # two batches at once
    assert all(s[1] == 0 for s in narrow), seen              # never beside a wide one
    assert all(s[2] == 0 for s in seen if s[0] == "wide"), seen
    assert sum(s[3] for s in seen) == 81


def test_one_stream_without_a_narrow_run_keeps_one_batch_at_a_time():
    engine = FakeEngine()
    batcher = Batcher(engine, packed=True, max_batch_tokens=100, streams=2)  # no narrow
    assert batcher.streams == 1
    run_jobs(batcher, [[request(2, 10 * i)] for i in range(5)])
    batcher.close()
    assert sorted(x for b in engine.batches for x in b) == [0, 10, 20, 30, 40]


@pytest.fixture
def any_load(monkeypatch):
    """Every load counts as light: a lone sequence may run on every core however fast the
    test sends (`test_a_lone_sequence_runs_on_every_core_at_a_light_load_...` tests the rule)."""
    from bertrt.serve.http import batcher

    monkeypatch.setattr(batcher, "LIGHT_GAP_S", 0.0)


class Recorder:
    """A packed run (each token's hidden state is its id) that records, per batch, the
    thread it ran on and its sequences' first ids; fails while `fail` is set."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []
        self.fail = False

    def __call__(self, requests: list[Request]) -> PackedOutputs:
        self.batches.append((threading.get_ident(), [int(r.input_ids[0]) for r in requests]))
        if self.fail:
            raise RuntimeError("the runtime failed")
        ids = np.concatenate([r.input_ids for r in requests]).astype(np.float32)[:, None]
        cu = np.concatenate([[0], np.cumsum([r.length for r in requests])])
        return PackedOutputs({"last_hidden_state": ids}, {}, cu)


def test_run_here_runs_a_request_on_the_callers_thread_only_on_an_idle_engine(any_load):
    wide, narrow = Recorder(), Recorder()
    batcher = Batcher(wide, packed=True, max_batch_tokens=10, narrow=narrow, streams=2,
                      inline_after_ms=100)
    here = threading.get_ident()
    done: list[Job] = []
    # the engine never ran: a lone request runs here, and is answered before run_here returns
    lone = Job([request(4, 7)], mean_ids, done.append)
    assert batcher.run_here(lone)
    assert wide.batches == [(here, [7])] and done == [lone]
    assert lone.results == [pytest.approx(8.5)] and lone.inference_s > 0
    # the engine ran just now (under load it always has): the next one is not run here
    assert not batcher.run_here(Job([request(2, 20)], mean_ids, done.append))
    time.sleep(0.15)
    # over the budget (one batch, at most: the loop waits for it), or not one batch
    assert not batcher.run_here(Job([request(11, 30)], mean_ids, done.append))
    assert not batcher.run_here(Job([request(6, 40), request(6, 50)], mean_ids, done.append))
    assert len(wide.batches) == 1 and done == [lone]
    # a request of two sequences that make one batch: one run, here
    pair = Job([request(4, 60), request(5, 70)], mean_ids, done.append)
    assert batcher.run_here(pair)
    assert wide.batches[-1] == (here, [60, 70]) and pair.results == pytest.approx([61.5, 72])
    # a failed run fails its request, and the engine goes on
    time.sleep(0.15)
    wide.fail = True
    broken = Job([request(3, 80)], mean_ids, done.append)
    assert batcher.run_here(broken)
    assert isinstance(broken.error, RuntimeError) and done[-1] is broken
    wide.fail = False
    [queued] = run_jobs(batcher, [[request(3, 90)]])
    assert queued.results == [pytest.approx(91)]
    assert wide.batches[-1][0] != here  # an engine thread ran it
    batcher.close()
    time.sleep(0.15)
    assert not batcher.run_here(Job([request(2, 100)], mean_ids, done.append))
    # without inline_after_ms, never
    off = Batcher(Recorder(), packed=True, max_batch_tokens=10)
    assert not off.run_here(Job([request(2, 1)], mean_ids, done.append))
    off.close()


def test_a_request_queued_during_an_inline_run_runs_after_it_and_inline_runs_go_on(any_load):
    """A sequence queued (from another thread) while `run_here` runs waits for it, runs on
    an engine thread, and leaves the batcher as it was: once idle, the next request runs
    inline again."""
    done: list[Job] = []
    queued: list[Job] = []

    def run(requests: list[Request]) -> PackedOutputs:
        if not queued:  # the inline run: another thread queues a request meanwhile
            queued.append(Job([request(2, 50)], mean_ids, done.append))
            submitter = threading.Thread(target=batcher.submit, args=(queued[0],))
            submitter.start()
            submitter.join()
            time.sleep(0.05)
        return recorder(requests)

    recorder = Recorder()
    batcher = Batcher(run, packed=True, max_batch_tokens=10, narrow=Recorder(), streams=2,
                      inline_after_ms=20)
    first = Job([request(3, 10)], mean_ids, done.append)
    assert batcher.run_here(first)
    deadline = time.monotonic() + 10
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [first, queued[0]] and queued[0].results == [pytest.approx(50.5)]
    assert recorder.batches[0][0] == threading.get_ident()
    assert recorder.batches[1][0] != threading.get_ident()  # an engine thread
    time.sleep(0.1)
    later = Job([request(2, 70)], mean_ids, done.append)
    assert batcher.run_here(later) and later.results == [pytest.approx(70.5)]
    batcher.close()


def test_run_here_waits_for_a_running_batch():
    engine = FakeEngine()
    batcher = Batcher(engine, packed=True, max_batch_tokens=100, narrow=Recorder(),
                      streams=2, inline_after_ms=1)
    engine.hold.clear()
    batcher.submit(Job([request(1, 100)], mean_ids, lambda job: None))
    assert engine.running.wait(5)
    time.sleep(0.05)  # the engine started long ago, but is busy
    assert not batcher.run_here(Job([request(2, 10)], mean_ids, lambda job: None))
    engine.hold.set()
    batcher.close()
    assert engine.batches == [[100]]


def test_a_burst_on_an_idle_streamed_server_runs_one_request_inline_and_batches_the_rest(
        encoder_dir, texts, monkeypatch):
    """Raw ASGI, an engine with streams: the first request of a burst finds the engine idle
    and runs on the event loop's thread; those read after it find the engine just used and
    go to the engine threads; every answer is the engine's own embedding."""
    from bertrt.serve import InferenceEngine
    from bertrt.serve.http import app as app_module

    monkeypatch.setattr(app_module, "INLINE_AFTER_MS", 200.0)
    with InferenceEngine(encoder_dir, backend="ort", threads=2, streams=2) as engine:
        assert engine.streams == 2
        server = app_module.Server(engine)
        threads: list[tuple[str, int]] = []  # (thread name, sequences) per batch
        run, run_narrow = server.service.run, server.service.run_narrow

        def recorded(fn):
            def call(requests):
                threads.append((threading.current_thread().name, len(requests)))
                return fn(requests)
            return call

        server.service.run = recorded(run)
        server.service.run_narrow = recorded(run_narrow)
        loop_thread = threading.current_thread().name

        async def scenario() -> tuple[list[list[dict]], list[dict]]:
            async with server.lifespan():
                burst = await asyncio.gather(*(asgi_post(server, {"inputs": text})
                                               for text in texts))
                await asyncio.sleep(0.3)  # idle again
                return burst, await asgi_post(server, {"inputs": texts[0]})

        burst, later = asyncio.run(scenario())
        expected = engine.embed(texts, normalize=True)
    answers = [json.loads(sent[1]["body"]) for sent in [*burst, later]]
    assert all(sent[0]["status"] == 200 for sent in [*burst, later])
    np.testing.assert_allclose(np.array(answers)[:, 0], np.vstack([expected, expected[:1]]),
                               atol=1e-5)
    inline = [n for name, n in threads if name == loop_thread]
    assert inline == [1, 1], threads  # one of the burst, and the request after the idle
    assert threads[-1] == (loop_thread, 1)
    assert all(name.startswith("bertrt-engine-") for name, _ in threads[1:-1]), threads
    assert sum(n for _, n in threads) == len(texts) + 1


def test_a_lone_sequence_runs_on_every_core_at_a_light_load_and_on_one_under_load():
    from bertrt.serve.http.batcher import LIGHT_GAP_S

    wide, narrow = Recorder(), Recorder()
    batcher = Batcher(wide, packed=True, max_batch_tokens=100, narrow=narrow, streams=2)

    def lone(first: int) -> str:
        """Where a lone request, sent when nothing runs, ran."""
        before = len(wide.batches)
        [job] = run_jobs(batcher, [[request(3, first)]])
        assert job.results == [pytest.approx(first + 1)]
        return "wide" if len(wide.batches) > before else "narrow"

    slow = 2 * LIGHT_GAP_S
    ran = []
    for i in range(6):  # arrivals twice the light gap apart
        time.sleep(slow)
        ran.append(lone(10 * i))
    assert ran == ["wide"] * 6
    ran = [lone(100 + 10 * i) for i in range(16)]  # back to back: the mean gap falls
    assert ran[0] == "wide" and ran[-3:] == ["narrow"] * 3, ran
    ran = []
    for i in range(12):  # slow again: the mean gap rises past the light gap
        time.sleep(4 * LIGHT_GAP_S)
        ran.append(lone(300 + 10 * i))
    assert ran[-4:] == ["wide"] * 4, ran
    batcher.close()
