"""The token-budget batcher: requests' sequences wait in one queue; engine threads run them.

    HTTP side (event loop + tokenizer threads)        engine thread(s)         finisher thread
    tokenize a request ─▶ Job ─▶ queue of sequences ─▶ cut a batch ─▶ run ─▶ pool / slice rows
                                                                            ─▶ resolve the Job

A batch is cut whenever the engine is free, from the sequences waiting, oldest first: as many
as fit the budget (a packed batch costs its real tokens; a padded one batch size x its
longest, as `bertrt.serve.engine.token_budget_batches` counts) and `max_batch_requests`; a
sequence over the budget runs alone. The budget is `max_batch_tokens`, or less with
`max_batch_ms`: the positions the engine runs in that many milliseconds, at the speed its
recent batches ran (`Pace`). A request waits for the batch running when it comes and then
for its own, so under load its latency is a few batch durations: a batch kept to a time
keeps the tail short on any machine, model or precision, as Clipper sizes its batches to a
latency objective. With `max_wait_ms`, a batch that the waiting sequences do
not fill waits until its oldest has waited that long (or the batch fills). Sequences of a
request whose client went away are dropped before they are computed.

The next batch is assembled while the current one runs: requests are tokenized and queued on
the HTTP side meanwhile, and the previous batch's results are pooled and handed out on the
finisher thread, so the engine thread only concatenates the next batch's ids and runs it.
When nothing waits once a batch is done (light load), the engine thread hands its results out
itself: the hop to the finisher would only add latency. The
batch stays open until the engine is free (TEI seals the next batch as the current one
starts): a request that arrives during a run still joins the batch right after it.

With streams (`narrow`, `streams` > 1), one engine thread per stream: under load each runs
its own batch on a single-thread session, the waiting work split evenly among the idle ones,
so a core the HTTP side borrows stalls one batch, not every batch's threads at each op. At a
light load (requests `LIGHT_GAP_S` apart or more, on average) a lone sequence with nothing
running still runs on every core, alone; faster, it runs on one core like any batch: a run
on every core leaves ONNX Runtime's pool threads spinning for ~25 ms after it, on the cores
the next requests' batches need (MiniLM at 100 requests/s: 25% less CPU a request, p50 16
against 23 ms).

With `inline_after_ms`, a request that finds the engine idle that long runs on the HTTP
side's own thread (`run_here`), skipping the hops to an engine thread and back; those arriving
meanwhile find the engine just used and queue.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bertrt.serve.engine import batch_cost
from bertrt.serve.http.errors import HttpError
from bertrt.serve.outputs import SequenceOutputs
from bertrt.serve.workload import Request

log = logging.getLogger("bertrt.serve")

#: The mean gap between requests' arrivals (an average over the last ~5-10) at or above
#: which a lone sequence runs on every core; closer, on one (see the module docstring).
LIGHT_GAP_S = 0.020


def batch_cut(lengths: Iterable[int], budget: int, max_requests: int | None,
              packed: bool) -> int:
    """How many of the leading sequences make the next batch (at least one, if any wait).

    Args:
        lengths: Lengths of the waiting sequences, oldest first (read lazily, up to the cut).
        budget: Positions a batch may cost: the sum of its lengths when packed, its size x
            its longest when padded.
        max_requests: At most this many sequences (None: no limit).
        packed: Cost real tokens instead of the padded rectangle.
    """
    size = tokens = longest = 0
    for length in lengths:
        if size and max_requests is not None and size >= max_requests:
            break
        longest = max(longest, length)
        cost = tokens + length if packed else (size + 1) * longest
        if size and cost > budget:
            break
        size += 1
        tokens += length
    return size


class Pace:
    """The engine's recent speed in seconds per position, and the budget that runs in a target
    time.

    Both sums decay by `decay` per batch, so the speed follows the last ~1 / (1 - decay)
    batches; positions weigh in as they were computed, so a full batch counts for more than
    a single query, whose fixed cost per run would otherwise read as a slow engine. The
    budget converges from either side: a batch cut short of the target runs faster per
    position than its share of the fixed cost says, and the next is cut longer.

    Args:
        target_s: Seconds a batch should take.
        floor: The smallest budget, in positions (one slow batch, e.g. the machine's other
            work, cannot shrink batches to nothing).
        decay: Weight of the past per batch.
    """

    def __init__(self, target_s: float, floor: int = 64, decay: float = 0.9) -> None:
        self.target_s, self.floor, self.decay = target_s, floor, decay
        self._seconds = self._positions = 0.0

    def observe(self, positions: int, seconds: float) -> None:
        self._seconds = self.decay * self._seconds + seconds
        self._positions = self.decay * self._positions + positions

    def budget(self, cap: int) -> int:
        """Positions a batch may cost to run in the target time (`cap` until a batch ran)."""
        if not self._seconds:
            return cap
        fit = int(self.target_s * self._positions / self._seconds)
        return max(min(fit, cap), min(self.floor, cap))


class BatchView:
    """One batch's outputs as the jobs in it read them; each pooling is computed once."""

    def __init__(self, outputs: SequenceOutputs) -> None:
        self.outputs = outputs
        self._pooled: dict[str, np.ndarray] = {}

    def pooled(self, mode: str) -> np.ndarray:
        """`last_hidden_state` pooled over each sequence: (B, H) float32."""
        if mode not in self._pooled:
            self._pooled[mode] = self.outputs.pool("last_hidden_state", mode)
        return self._pooled[mode]


#: What a job reads from a batch for its sequences at `rows`: one value per row.
Reader = Callable[[BatchView, np.ndarray], Sequence[Any]]


class Job:
    """One request's sequences, waiting for or in batches, and what is read from them.

    Args:
        requests: The tokenized sequences.
        read: Reads the values of the job's rows of a batch (on the finisher thread).
        done: Called once, on the finisher thread, when every sequence has been read or a
            batch holding one failed; `results` (in sequence order) or `error` is then set.
    """

    __slots__ = ("requests", "read", "done", "results", "error", "cancelled", "enqueued",
                 "started", "inference_s", "batches", "arrived", "_remaining")

    def __init__(self, requests: Sequence[Request], read: Reader,
                 done: Callable[[Job], None]) -> None:
        self.requests = list(requests)
        self.read = read
        self.done = done
        self.results: list[Any] = [None] * len(self.requests)
        self.error: BaseException | None = None
        #: Set when the client went away: the job's waiting sequences are not computed.
        self.cancelled = False
        self.enqueued = time.perf_counter()
        #: When the first batch holding one of its sequences started.
        self.started: float | None = None
        #: Seconds of the batches that ran its sequences, summed.
        self.inference_s = 0.0
        self.batches = 0
        #: Whether the batcher counted its arrival (`run_here` or `submit`, whichever first).
        self.arrived = False
        self._remaining = len(self.requests)

    @property
    def queue_s(self) -> float:
        """Seconds from queueing to the start of its first batch."""
        return (self.started or self.enqueued) - self.enqueued


class _Entry:
    __slots__ = ("job", "index", "length")

    def __init__(self, job: Job, index: int) -> None:
        self.job, self.index = job, index
        self.length = job.requests[index].length


class Batcher:
    """The queue, the engine thread that cuts and runs batches, and the finisher thread.

    Args:
        run: Runs one batch of sequences (`backend.run_sequences`); called on the engine
            thread only.
        packed: Whether `run` computes real tokens only (the budget then counts them).
        max_batch_tokens, max_batch_requests, max_wait_ms: See `ServeOptions`.
        max_batch_ms: A batch's target duration: the budget shrinks below `max_batch_tokens`
            to what the engine runs in that time (`Pace`); None or 0: `max_batch_tokens`.
        narrow, streams: With `narrow` (a run on one core, safe to call from several threads
            at once) and `streams` > 1: that many engine threads, each running its own batch
            on `narrow` under load, the waiting work split evenly among the idle ones; at a
            light load a lone sequence with nothing running goes on `run` (every core: a
            light load's latency), and the others wait until it ends, so the cores are never
            oversubscribed.
        metrics: A `metrics.ServerMetrics` to tell each batch (sequences, tokens, positions,
            seconds), the budget, and the sequences dropped; None: nothing is told (it reads
            the queue's size from `queued`).
        inline_after_ms: Let `run_here` run a request on the caller's thread once the engine
            has been idle this long (None: never; every request queues).
    """

    def __init__(self, run: Callable[[list[Request]], SequenceOutputs], *, packed: bool,
                 max_batch_tokens: int, max_batch_requests: int | None = None,
                 max_wait_ms: float = 0.0, max_batch_ms: float | None = None,
                 metrics: Any = None,
                 narrow: Callable[[list[Request]], SequenceOutputs] | None = None,
                 streams: int = 1, inline_after_ms: float | None = None) -> None:
        self._run = run
        self._narrow = narrow if streams > 1 else None
        self.streams = streams if self._narrow is not None else 1
        self.packed = packed
        self.max_batch_tokens = max_batch_tokens
        # each kind of run keeps its own speed: a narrow one runs on one core
        self.pace = Pace(max_batch_ms / 1000.0) if max_batch_ms else None
        self.narrow_pace = Pace(max_batch_ms / 1000.0) if max_batch_ms else None
        self.max_batch_requests = max_batch_requests
        self.max_wait_s = max_wait_ms / 1000.0
        self._metrics = metrics
        self._cv = threading.Condition()
        self._queue: deque[_Entry] = deque()
        self._cancelled = 0  # jobs cancelled since the last purge
        #: Batches handed to the finisher and not finished: while any is, the engine thread
        #: does not finish one itself (a job's batches are read one at a time).
        self._finishing = 0
        self._running = 0  # batches running
        self._wide = False  # a batch runs on every core: nothing else may start
        self._closed = False
        self._inline_after_s = None if inline_after_ms is None else inline_after_ms / 1000.0
        self._idle_since = -float("inf")  # when the last batch ended
        self._last_arrival: float | None = None
        self._gap_s: float | None = None  # the mean gap between arrivals (decaying)
        self._job_lock = threading.Lock()  # jobs' results, when streams finish at once
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="bertrt-finisher")
        self._threads = [threading.Thread(target=self._loop, name=f"bertrt-engine-{i}",
                                          daemon=True) for i in range(self.streams)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ HTTP side
    def submit(self, job: Job) -> None:
        """Queue every sequence of `job`.

        Raises:
            HttpError: unavailable, once `close` was called.
        """
        with self._cv:
            if self._closed:
                raise HttpError("unavailable", "the server is shutting down")
            self._arrive(job)
            self._queue.extend(_Entry(job, i) for i in range(len(job.requests)))
            self._cv.notify()

    def run_here(self, job: Job) -> bool:
        """Run `job` on the calling thread, the event loop's, when the engine has been idle
        for `inline_after_ms`, the load is light (`LIGHT_GAP_S`) and its sequences make one
        batch; False (nothing done): queue it with `submit`.

        A lone request on an idle server then skips two thread hops (to an engine thread
        and back), each a wake-up of a thread whose core has gone cold. The loop reads
        nothing else for the run (one batch, within the budget); requests that arrive
        meanwhile find the engine just used and queue as usual, so a burst is batched.
        """
        if self._inline_after_s is None:
            return False
        lengths = [r.length for r in job.requests]
        too_many = (self.max_batch_requests is not None
                    and len(lengths) > self.max_batch_requests)
        with self._cv:
            self._arrive(job)
            if (self._closed or self._queue or self._running or self._finishing or too_many
                    or time.perf_counter() - self._idle_since < self._inline_after_s
                    or batch_cost(lengths, self.packed) > self.budget or not self._light()):
                return False
            self._running += 1
            self._wide = True  # the engine threads wait for it
        batch = [_Entry(job, i) for i in range(len(job.requests))]
        outputs, error, started, seconds = self._execute(batch, True)
        self._ran(batch, True, error, started, seconds, here=True)
        self._finish(batch, outputs, error, started, seconds)
        return True

    def _arrive(self, job: Job) -> None:
        """Count `job`'s arrival once (under the lock): the mean gap between arrivals."""
        if job.arrived:
            return
        job.arrived = True
        if self._last_arrival is not None:
            gap = min(max(job.enqueued - self._last_arrival, 0.0), 1.0)
            self._gap_s = gap if self._gap_s is None else 0.8 * self._gap_s + 0.2 * gap
        self._last_arrival = job.enqueued

    def _light(self) -> bool:
        """Whether requests arrive `LIGHT_GAP_S` apart or more, on average (a light load)."""
        return self._gap_s is None or self._gap_s >= LIGHT_GAP_S

    def cancel(self, job: Job) -> None:
        """Drop the job's sequences that have not run (its client went away)."""
        with self._cv:
            job.cancelled = True
            self._cancelled += 1

    def _budget(self, pace: Pace | None) -> int:
        return pace.budget(self.max_batch_tokens) if pace else self.max_batch_tokens

    @property
    def budget(self) -> int:
        """The positions the next batch on `run` may cost."""
        return self._budget(self.pace)

    @property
    def narrow_budget(self) -> int:
        """The positions the next batch on `narrow` may cost."""
        return self._budget(self.narrow_pace)

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads) and not self._closed

    @property
    def queued(self) -> int:
        """Sequences waiting."""
        return len(self._queue)

    def close(self) -> None:
        """Run what is queued, then stop the engine threads and the finisher."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join()
        self._finisher.shutdown(wait=True)

    # ------------------------------------------------------------------ engine thread
    def _purge(self) -> None:
        """Remove the sequences of cancelled jobs (under the lock)."""
        if not self._cancelled:
            return
        kept = deque(e for e in self._queue if not e.job.cancelled)
        if self._metrics is not None:
            self._metrics.dropped_sequences(len(self._queue) - len(kept))
        self._queue, self._cancelled = kept, 0

    def _cut(self, budget: int, extra: tuple[int, ...] = ()) -> int:
        return batch_cut(itertools.chain((e.length for e in self._queue), extra),
                         budget, self.max_batch_requests, self.packed)

    def _full(self, size: int, budget: int) -> bool:
        """Whether a batch of the first `size` waiting sequences has no room for another
        (not even one token long)."""
        return size < len(self._queue) or self._cut(budget, (1,)) == size

    def _share(self) -> int:
        """A narrow batch's budget: its pace's, or an even share of what waits among the
        idle streams, whichever is less (every core gets work)."""
        idle = self.streams - self._running
        waiting = sum(e.length for e in self._queue)
        return max(1, min(self.narrow_budget, -(-waiting // idle)))

    def _next_batch(self) -> tuple[list[_Entry], bool] | None:
        """The next batch and whether it runs on every core, once there is one to run
        (None: closed and drained)."""
        with self._cv:
            while True:
                self._purge()
                if not self._queue or self._wide:
                    if self._closed and not self._queue:
                        return None
                    self._cv.wait()
                    continue
                wide = self._narrow is None or (not self._running and len(self._queue) == 1
                                                 and self._light())
                budget = self.budget if wide else self._share()
                size = self._cut(budget)
                if self.max_wait_s and not self._closed and not self._full(size, budget):
                    left = self._queue[0].job.enqueued + self.max_wait_s - time.perf_counter()
                    if left > 0:  # not full: gather more until the oldest has waited enough
                        self._cv.wait(left)
                        continue
                batch = [self._queue.popleft() for _ in range(size)]
                self._running += 1
                self._wide = wide and self._narrow is not None
                if self._queue:
                    self._cv.notify()  # an idle stream takes the rest
                return batch, wide

    def _loop(self) -> None:
        while (got := self._next_batch()) is not None:
            batch, wide = got
            outputs, error, started, seconds = self._execute(batch, wide)
            if self._ran(batch, wide, error, started, seconds):
                # nothing waits (light load): answering here saves a thread hop
                self._finish(batch, outputs, error, started, seconds)
            else:  # the next batch waits: hand the results on and run it
                self._finisher.submit(self._finish_later, batch, outputs, error, started,
                                      seconds)

    def _execute(self, batch: list[_Entry], wide: bool
                 ) -> tuple[SequenceOutputs | None, BaseException | None, float, float]:
        """Run a batch: its outputs or error, when it started and its seconds."""
        run = self._run if wide else self._narrow
        assert run is not None
        started = time.perf_counter()
        outputs: SequenceOutputs | None = None
        error: BaseException | None = None
        try:
            outputs = run([e.job.requests[e.index] for e in batch])
        except Exception as exc:  # the batch's requests fail; the server goes on
            log.exception("a batch of %d sequences failed", len(batch))
            error = exc
        return outputs, error, started, time.perf_counter() - started

    def _ran(self, batch: list[_Entry], wide: bool, error: BaseException | None,
             started: float, seconds: float, here: bool = False) -> bool:
        """Account for a batch that ran (its pace, the engine free again, the metrics);
        whether its results are handed out on this thread (nothing waits, or `here`: the
        caller of `run_here` hands them out itself) rather than on the finisher."""
        lengths = [e.length for e in batch]
        positions = batch_cost(lengths, self.packed)
        with self._cv:
            pace = self.pace if wide else self.narrow_pace
            if pace is not None and error is None:
                pace.observe(positions, seconds)
            self._running -= 1
            self._wide = False
            self._idle_since = started + seconds
            inline = here or (not self._queue and not self._finishing)
            self._finishing += not inline
            if self._queue:  # (an idle engine thread waits for work: nothing to wake it for)
                if wide:  # every stream may start again
                    self._cv.notify_all()
                else:
                    self._cv.notify()
        if self._metrics is not None:
            self._metrics.observe_batch(
                len(batch), sum(lengths), positions, seconds,
                self.budget if self._narrow is None else self.narrow_budget)
        return inline

    # ------------------------------------------------------------------ finisher thread
    def _finish_later(self, *args: Any) -> None:
        try:
            self._finish(*args)
        finally:
            with self._cv:
                self._finishing -= 1

    def _finish(self, batch: list[_Entry], outputs: SequenceOutputs | None,
                error: BaseException | None, started: float, seconds: float) -> None:
        by_job: dict[Job, tuple[list[int], list[int]]] = {}
        for row, entry in enumerate(batch):
            rows, indices = by_job.setdefault(entry.job, ([], []))
            rows.append(row)
            indices.append(entry.index)
        view = None if outputs is None else BatchView(outputs)
        with self._job_lock:
            self._finish_jobs(by_job, view, error, started, seconds)

    @staticmethod
    def _finish_jobs(by_job: dict[Job, tuple[list[int], list[int]]], view: BatchView | None,
                     error: BaseException | None, started: float, seconds: float) -> None:
        for job, (rows, indices) in by_job.items():
            if job.cancelled or job.error is not None:
                continue
            if job.started is None:
                job.started = started
            job.inference_s += seconds
            job.batches += 1
            try:
                if view is None:
                    raise error  # type: ignore[misc]
                for index, value in zip(indices, job.read(view, np.asarray(rows))):
                    job.results[index] = value
            except Exception as exc:
                job.error = exc
            job._remaining -= len(rows)
            if job.error is not None or job._remaining == 0:
                job.done(job)
