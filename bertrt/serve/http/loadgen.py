"""Load against a live server: open loop (Poisson arrivals at a rate) and closed loop (C
clients, each sending its next request when its last one is answered).

- **Open loop**: arrivals are a Poisson process of the offered rate, independent of the
  answers, so a server that falls behind sees its queue grow, as real traffic does. No
  catch-up: when the sender itself is late for an arrival (a stalled client), the schedule
  moves on from then instead of firing the missed arrivals in a burst; `sent_per_s` says the
  rate actually offered. Latency runs from each request's send to its last byte.
- **Closed loop**: `concurrency` clients; throughput at a fixed number of requests in flight.

Both are bounded: sending stops after `duration` seconds or `max_requests` requests, and a
request not answered within `timeout` seconds counts as an error; nothing outlives the call.
Each request carries one text (`{"inputs": text, "truncate": true}`, the route by the model's
head, from `GET /info`), the texts taken in order, cycling. The requests are prepared as bytes
before a load starts and sent by `client.LoadClient`, whose cost per request (CPU the server
shares, time every latency includes) is a third of a general client's.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bertrt.errors import BertrtError
from bertrt.serve.http.client import LoadClient, RequestTimeout, run_loop
from bertrt.serve.http.heap import frozen_heap

#: The route a load runs against, by the model's head.
ROUTE_OF_HEAD = {"none": "/embed", "pretraining": "/embed", "classification": "/predict",
                 "token-classification": "/tag"}


@dataclass
class LoadPoint:
    """What one load (one rate, or one concurrency) measured."""

    mode: str  # "open" or "closed"
    #: Offered requests/s (open loop) or clients (closed loop).
    load: float
    seconds: float
    sent: int
    ok: int
    #: Failures by kind: an HTTP status ("429", "413", "500", ...), "timeout", "connect".
    errors: dict[str, int] = field(default_factory=dict)
    #: Latency of each answered (2xx) request, seconds.
    latencies: list[float] = field(default_factory=list, repr=False)
    #: Milliseconds by stage, one per answered request whose response carried the stage's
    #: timing header (`client.STAGE_HEADERS`: tokenize, queue, inference, total), and
    #: "outside": the latency less the server's total (HTTP, the network, the client).
    stages: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def throughput(self) -> float:
        """Answered requests per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        return float(np.percentile(self.latencies, q)) * 1e3

    def stage_ms(self, stage: str, q: float = 50) -> float:
        """A percentile of one stage's milliseconds (nan: no response carried it)."""
        values = self.stages.get(stage)
        return float(np.percentile(values, q)) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "load": self.load, "seconds": round(self.seconds, 3),
                "sent": self.sent, "sent_per_s": round(self.sent / self.seconds, 3)
                if self.seconds else 0.0, "ok": self.ok,
                "throughput": round(self.throughput, 3), "errors": dict(self.errors),
                **{f"p{q}_ms": round(self.percentile_ms(q), 3) for q in (50, 90, 99)},
                "mean_ms": round(float(np.mean(self.latencies)) * 1e3, 3)
                if self.latencies else math.nan,
                "stages_p50_ms": {k: round(self.stage_ms(k), 3) for k in self.stages}}


@dataclass
class LoadRun:
    """The loads of one server (one configuration)."""

    label: str
    url: str
    route: str
    info: dict[str, Any]
    points: list[LoadPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "url": self.url, "route": self.route, "info": self.info,
                "points": [p.to_dict() for p in self.points]}


def _body(text: str) -> bytes:
    return json.dumps({"inputs": text, "truncate": True}).encode("utf-8")


class _Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.stages: dict[str, list[float]] = {}
        self.errors: Counter[str] = Counter()
        self.sent = 0

    async def send(self, client: LoadClient, request: bytes) -> None:
        self.sent += 1
        stages: dict[str, float] = {}
        start = time.perf_counter()
        try:
            status = await client.send(request, stages)
        except RequestTimeout:
            self.errors["timeout"] += 1
            return
        except OSError:
            self.errors["connect"] += 1
            return
        if 200 <= status < 300:
            latency = time.perf_counter() - start
            self.latencies.append(latency)
            if "total" in stages:
                stages["outside"] = latency * 1e3 - stages["total"]
            for stage, ms in stages.items():
                self.stages.setdefault(stage, []).append(ms)
        else:
            self.errors[str(status)] += 1

    def point(self, mode: str, load: float, seconds: float) -> LoadPoint:
        ok = len(self.latencies)
        return LoadPoint(mode, load, seconds, self.sent, ok, dict(self.errors),
                         self.latencies, self.stages)


async def _open_loop(url: str, requests: Sequence[bytes], rate: float, duration: float,
                     max_requests: int, timeout: float, seed: int) -> LoadPoint:
    rng = np.random.default_rng(seed)
    recorder = _Recorder()
    tasks: set[asyncio.Task[None]] = set()
    async with LoadClient(url, connections=2048, timeout=timeout) as client:
        start = time.perf_counter()
        due = start
        for i in range(max_requests):
            due += rng.exponential(1.0 / rate)
            if due - start >= duration:
                break
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                due = time.perf_counter()  # late: go on from now, no burst to catch up
            task = asyncio.create_task(recorder.send(client, requests[i % len(requests)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        window = max(time.perf_counter() - start, 1e-9)
        if tasks:  # each is bounded by the client's timeout
            await asyncio.gather(*tasks)
    return recorder.point("open", rate, window)


async def _closed_loop(url: str, requests: Sequence[bytes], concurrency: int, duration: float,
                       max_requests: int, timeout: float) -> LoadPoint:
    recorder = _Recorder()
    counter = iter(range(max_requests))

    async def worker(client: LoadClient, stop: float) -> None:
        for i in counter:
            if time.perf_counter() >= stop:
                return
            await recorder.send(client, requests[i % len(requests)])

    async with LoadClient(url, connections=concurrency, timeout=timeout) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client, start + duration) for _ in range(concurrency)))
        window = max(time.perf_counter() - start, 1e-9)
    return recorder.point("closed", concurrency, window)


def server_info(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """`GET /info` of a live server.

    Raises:
        BertrtError: nothing answers at `url`, or not a bertrt server.
    """
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/info", timeout=timeout, trust_env=False)
        info = response.json()
    except httpx.HTTPError as exc:
        raise BertrtError(f"--url {url}: no server answers ({exc})") from None
    except ValueError:
        raise BertrtError(f"--url {url}: GET /info is not JSON (not a bertrt server?)"
                          ) from None
    if response.status_code != 200 or "head" not in info:
        raise BertrtError(f"--url {url}: GET /info gave {response.status_code} without a "
                          "head (not a bertrt server?)")
    return info


def run_load(url: str, texts: Sequence[str], *, rates: Sequence[float] = (),
             concurrency: Sequence[int] = (), duration: float = 10.0,
             max_requests: int | None = None, timeout: float = 10.0, route: str | None = None,
             label: str = "server", seed: int = 0, warmup: int = 8,
             log: Any = None) -> LoadRun:
    """Each rate (open loop), then each concurrency (closed loop), against the server at `url`.

    Args:
        url: The server, e.g. `http://127.0.0.1:8080`.
        texts: The texts, one per request, in order, cycling.
        rates: Offered requests/s of the open-loop points.
        concurrency: Clients of the closed-loop points.
        duration: Seconds each point sends for.
        max_requests: At most this many requests per point (None: twice what the rate
            offers in `duration`, and 100,000 for a closed loop).
        timeout: Seconds a request may take before it counts as an error.
        route: The route (None: by the model's head, from `GET /info`).
        label: The configuration's name in the report.
        seed: The arrivals' random stream (each rate gets its own from it).
        warmup: Requests sent one at a time first, untimed.
        log: Called with a line per point.
    """
    if not texts:
        raise BertrtError("no texts to send")
    if not rates and not concurrency:
        raise BertrtError("give --rate R1,R2,... (open loop) or --concurrency C1,C2,... "
                          "(closed loop)")
    if any(r <= 0 for r in rates) or any(c < 1 for c in concurrency) or duration <= 0:
        raise BertrtError("rates, concurrency and --duration must be positive")
    url = url.rstrip("/")
    info = server_info(url)
    route = route or ROUTE_OF_HEAD.get(info["head"], "/embed")
    prepare = LoadClient(url)
    requests = [prepare.post_bytes(route, _body(text)) for text in texts]
    run = LoadRun(label, url, route, info)

    async def main() -> None:
        async with LoadClient(url, connections=1, timeout=timeout) as client:
            warm = _Recorder()  # its errors show in the points that follow, if they last
            for request in requests[:warmup]:
                await warm.send(client, request)
        for k, rate in enumerate(rates):
            cap = max_requests or int(2 * rate * duration) + 10
            point = await _open_loop(url, requests, rate, duration, cap, timeout, seed + k)
            run.points.append(point)
            if log:
                log(format_point(label, point))
        for clients in concurrency:
            point = await _closed_loop(url, requests, clients, duration,
                                       max_requests or 100_000, timeout)
            run.points.append(point)
            if log:
                log(format_point(label, point))

    with frozen_heap():  # the caller's heap (an engine, torch) out of the timed loop's way
        run_loop(main())
    return run


def format_stages(point: LoadPoint) -> str:
    """The p50 milliseconds of a point's stages: "queue 0.1, inference 6.5, outside 0.8"
    ("-": the server sent no timing headers)."""
    parts = [f"{stage} {point.stage_ms(stage):.1f}"
             for stage in ("queue", "inference", "outside") if stage in point.stages]
    return ", ".join(parts) or "-"


def format_point(label: str, point: LoadPoint) -> str:
    unit = "req/s" if point.mode == "open" else "clients"
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(point.errors.items())) or "none"
    where = f", p50 by stage: {format_stages(point)} ms" if point.stages else ""
    return (f"{label}: {point.load:g} {unit}: {point.throughput:.1f} answered/s, p50 "
            f"{point.percentile_ms(50):.1f} ms, p99 {point.percentile_ms(99):.1f} ms"
            f"{where}, errors {errors}")


def format_table(runs: Sequence[LoadRun]) -> str:
    """One row per configuration and load: offered, sent and answered rates, latency
    percentiles, errors, and where a request's time went by the server's timing headers
    (p50 of the queue, the inference, and what lies outside the server's handler: HTTP, the
    network, the client)."""
    header = ("| config | loop | offered | sent/s | answered/s | p50 ms | p90 ms | p99 ms | "
              "errors | p50 by stage ms |")
    rows = [header, "|" + "---|" * 10]
    for run in runs:
        for p in run.points:
            offered = f"{p.load:g} req/s" if p.mode == "open" else f"{p.load:g} clients"
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(p.errors.items())) or "0"
            rows.append(f"| {run.label} | {p.mode} | {offered} | {p.sent / p.seconds:.1f} | "
                        f"{p.throughput:.1f} | {p.percentile_ms(50):.1f} | "
                        f"{p.percentile_ms(90):.1f} | {p.percentile_ms(99):.1f} | {errors} | "
                        f"{format_stages(p)} |")
    return "\n".join(rows)


def to_json(runs: Sequence[LoadRun], **extra: Any) -> str:
    return json.dumps({**extra, "runs": [run.to_dict() for run in runs]}, indent=2)


def plot(runs: Sequence[LoadRun], path: str, title: str = "") -> bool:
    """A PNG of p50 and p99 latency against offered rate (open-loop points), one line pair
    per configuration; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from bertrt.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = sorted((p for p in run.points if p.mode == "open"), key=lambda p: p.load)
        if not points:
            continue
        rates = [p.load for p in points]
        line = ax.plot(rates, [p.percentile_ms(50) for p in points], marker="o",
                       label=f"{run.label} p50")[0]
        ax.plot(rates, [p.percentile_ms(99) for p in points], marker="^", linestyle="--",
                color=line.get_color(), label=f"{run.label} p99")
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True
