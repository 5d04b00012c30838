"""Serving under load: `bertrt serve` against the same server configured as the anchors
(text-embeddings-inference, Infinity, Triton) run on a CPU, on real text.

Every configuration is one `bertrt serve` process of MiniLM-L6 on 127.0.0.1 with 2 model
threads, all started at once and loaded in turn (interleaved: a drift of the shared machine
hits them alike):

- `bertrt packed fp32`: the default, padding-free batches cut by a budget of real tokens,
  kept to what the engine runs in 40 ms (`--max-batch-ms`), one batch per model thread at
  once under load (`--streams`, on ONNX Runtime: `auto` keeps it over OpenVINO fp32 for a
  server);
- `anchor: padded, <= 8 per batch`: text-embeddings-inference as it runs on a CPU: the
  waiting requests taken oldest first, at most 8 a batch while 8 x the longest fits its
  default budget of 16384 positions (which 8 inputs of at most 256 tokens always do), each
  batch padded to its longest, fp32;
- `padded fp32`: bertrt's padded batches, cut by its own budget (512 positions on ONNX
  Runtime's CPU provider: a long input no longer pads a batch of short ones), no count cap:
  what the budget alone buys, without packing;
- `bertrt packed int8`: ONNX Runtime on the int8 export (`--backend ort --precision int8`);
- OpenVINO fp32 and bf16 where the engine offers them and the machine runs them (bf16
  needs the CPU's bf16 units; otherwise its line says why not), with OpenVINO's own streams
  under load: fp32 is the other side of `auto`'s choice for a loaded server (more requests
  under load, a slower lone request), bf16 the best CPU backend x precision.

Every engine in this process runs the backend and precision a server reports in `/info`
(one engine per backend x precision): `auto` may choose another here than a server does.
Correctness first: each server's `/embed` of the first texts is checked against
`InferenceEngine.embed` in this process (fp32: max abs 1e-5; int8: min cosine 0.99). Then
per configuration: its saturation throughput (closed loop, 16 clients, 4 s); the highest
open-loop Poisson rate whose p99 stays within `--p99-ms`, by `--steps` bisections between 0
and 1.4x the saturation (each rate sent for `--duration` seconds, longer at low rates so it sends
`--samples` requests, at most 4x, in `--slices` slices taken round-robin over the servers, so
a drift of the shared machine lands on all of them; a rate passes when the p99 of more than
half of its slices is within the bound and none had an error, so one stall of the machine
fails a slice, not the rate, and the table pools the slices); and a
light load at 10 % of the default's highest rate, whose p50 is set beside a single
unbatched engine call (`engine.embed([text])`, p50 over 80 of the texts, measured in this
process while the servers idle, each call after a Poisson gap at the light load's rate, as
the requests arrive, on the engine of the server's backend x precision; the default's
back-to-back p50 is printed too),
both in `--slices` slices taken in turn (the machine's speed drifts over minutes). Last, the
offline ceiling: the default server's engine's texts/s on all the texts at once
(length-sorted budget batches, nothing else running), on its threads and on its streams (a
batch per core, as the loaded server runs), which bound its rate; and
the HTTP floor: `GET /health` at the light rate, the round trip every request pays beside
its engine call.
Bounded: about 8 minutes with the defaults (six bisection steps: the highest rate to 1/64 of
the saturation, ~1.6 %; four left it to ~6.5 %, as much as the ratios' run-to-run spread).

    python tools/bench_serve.py [--texts 1000] [--duration 6] [--samples 120] [--slices 3]
                                [--steps 6]
                                [--threads 2] [--p99-ms 250] [--markdown] [--json OUT]
                                [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
from bench_packed import real_texts  # the script's folder
from bench_torch import minilm_dir, time_interleaved

from bertrt.errors import BertrtError
from bertrt.serve.engine import ENGINE_BACKENDS, InferenceEngine
from bertrt.serve.http.live import ServerProcess
from bertrt.serve.http.loadgen import (
    LoadPoint,
    LoadRun,
    format_point,
    format_stages,
    plot,
    run_load,
    server_info,
)
from bertrt.serve.selection import time_backend
from bertrt.serve.workload import Request

#: (label, `bertrt serve` arguments); the first is bertrt's default, the second the anchor.
CONFIGS = [
    ("bertrt packed fp32", ""),
    # text-embeddings-inference's CPU defaults: padded, 8 a batch, --max-batch-tokens 16384,
    # no batch-time target
    ("anchor: padded, <= 8 per batch", "--padded --max-batch-requests 8 "
     "--max-batch-tokens 16384 --max-batch-ms 0"),
    ("padded fp32", "--padded"),
    # ONNX Runtime named: `--precision int8` alone lets auto pick any backend within the int8
    # gate (OpenVINO bf16 where the CPU has it)
    ("bertrt packed int8", "--backend ort --precision int8"),
]


#: The key of the default engine's single calls sent back to back (not after Poisson gaps).
BACK_TO_BACK = "default, back to back"

#: The bisection's upper bound, x the closed loop's saturation.
TOP = 1.4


def capped(rate: float | None, top: float, steps: int) -> str:
    """The highest rate as the table shows it: ">= rate" where every bisection step passed,
    so the upper bound `top`, not the p99, stopped it."""
    if rate is None:
        return "none"
    return f">= {rate}" if rate >= top * (1 - 0.5 ** steps) - 0.05 else str(rate)


def best_cpu_configs(model: str, threads: int) -> tuple[list[tuple[str, str]], str]:
    """OpenVINO fp32 (the other side of `auto`'s choice for a loaded server: more under load,
    slower alone) and bf16, those the engine offers and this machine runs (bf16 needs the
    CPU's bf16 units); and why not, for those left out."""
    if "openvino" not in ENGINE_BACKENDS:
        return [], ("not in this build (the engine's backends: "
                    f"{', '.join(ENGINE_BACKENDS)})")
    configs, why_not = [], []
    for precision in ("fp32", "bf16"):
        try:
            InferenceEngine(model, backend="openvino", precision=precision,
                            threads=threads).close()
        except BertrtError as exc:
            why_not.append(f"{precision} not available here ({exc})")
            continue
        configs.append((f"openvino {precision}",
                        f"--backend openvino --precision {precision}"))
    return configs, "; ".join(why_not)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def check_outputs(server: ServerProcess, label: str, texts: list[str],
                  expected: np.ndarray) -> str:
    import httpx

    got = np.array(httpx.post(f"{server.url}/embed", json={"inputs": texts, "truncate": True},
                              timeout=60).json(), dtype=np.float32)
    if "int8" in label or "bf16" in label:
        cosine = float((got * expected).sum(1).min())
        assert cosine >= 0.99, f"{label}: min cosine {cosine:.4f} to the fp32 engine"
        return f"min cosine {cosine:.4f}"
    diff = float(np.abs(got - expected).max())
    assert diff < 1e-5, f"{label}: max abs diff {diff:.2e} to the engine"
    return f"max abs diff {diff:.1e}"


def pool(points: list[LoadPoint]) -> LoadPoint:
    """One point of several slices of the same load."""
    errors: dict[str, int] = {}
    for p in points:
        for kind, count in p.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    stages: dict[str, list[float]] = {}
    for p in points:
        for stage, values in p.stages.items():
            stages.setdefault(stage, []).extend(values)
    return LoadPoint(points[0].mode, points[0].load, sum(p.seconds for p in points),
                     sum(p.sent for p in points), sum(p.ok for p in points), errors,
                     [x for p in points for x in p.latencies], stages)


def within(slices: list[LoadPoint], p99_ms: float) -> bool:
    """Whether a rate kept its p99 within `p99_ms`: in more than half of its slices (the
    median slice's p99), and without an error in any. A stall of the shared machine (its
    other tenants) that lands in one slice of one configuration fails that slice alone; a
    rate the server cannot keep up with builds its queue in every slice. The same rule for every
    configuration; pooling the slices instead let one such stall sink a rate, and with it
    every higher step of that configuration's bisection."""
    passed = sum(p.percentile_ms(99) <= p99_ms for p in slices)
    return passed * 2 > len(slices) and not any(p.errors for p in slices)


def single_calls(engine: InferenceEngine, texts: list[str], rate: float | None = None,
                 seed: int = 0) -> list[float]:
    """Milliseconds of `engine.embed([text])` for each of `texts`: back to back, or with
    `rate`, each call after a Poisson gap as the light load's requests arrive (an idle gap
    costs a call ~1.5 ms here: the runtime's threads and caches go cold)."""
    rng = np.random.default_rng(seed)
    times = []
    for text in texts:
        if rate:
            time.sleep(rng.exponential(1.0 / rate))
        start = time.perf_counter()
        engine.embed([text])
        times.append((time.perf_counter() - start) * 1e3)
    return times


def streamed_rate(engine: InferenceEngine, requests: list[Request]) -> float | None:
    """Sequences/s of `engine`'s streams on every one of `requests` at once, as a loaded
    server runs them (`time_backend`: length-sorted batches shared among `engine.streams`
    threads on its narrow backend; None: the engine has no streams)."""
    if engine.streams < 2:
        return None
    batch_ms, _ = time_backend(engine.backend, requests, requests[:1], engine.tokenizer.pad_id,
                               engine.streams)
    return len(requests) / (batch_ms / 1e3)


def http_floor(url: str, rate: float, count: int = 60, seed: int = 0) -> float:
    """p50 milliseconds of `GET /health` (no body, no model) arriving at `rate` as the light
    load's requests do, sent by the load's client: the HTTP round trip every request pays,
    client included."""
    import asyncio

    from bertrt.serve.http.client import LoadClient, run_loop

    async def main() -> list[float]:
        rng = np.random.default_rng(seed)
        times = []
        async with LoadClient(url, connections=1) as client:
            request = client.get_bytes("/health")
            for _ in range(count):
                await asyncio.sleep(rng.exponential(1.0 / rate))
                start = time.perf_counter()
                await client.send(request)
                times.append((time.perf_counter() - start) * 1e3)
        return times

    return float(np.median(run_loop(main())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=6.0,
                        help="Seconds per open-loop rate (longer for low rates, to send "
                             "--samples requests, up to 4x).")
    parser.add_argument("--samples", type=int, default=120,
                        help="Requests an open-loop rate should send, for its p99.")
    parser.add_argument("--slices", type=int, default=3,
                        help="Slices each rate is sent in, round-robin over the servers.")
    parser.add_argument("--steps", type=int, default=6,
                        help="Bisection steps of the highest rate within the p99 bound.")
    parser.add_argument("--light-duration", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--p99-ms", type=float, default=250.0)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)

    model = str(minilm_dir())
    texts = real_texts(args.texts)
    configs = list(CONFIGS)
    best, why_not = best_cpu_configs(model, args.threads)
    configs += best
    started = time.perf_counter()
    load_before = os.getloadavg()
    servers: list[ServerProcess] = []
    engines: list[InferenceEngine] = []
    runs = [LoadRun(label, "", "", {}) for label, _ in configs]
    try:
        for label, extra in configs:
            print(f"starting {label}: bertrt serve MiniLM {extra}", file=sys.stderr)
            servers.append(ServerProcess(model, [*extra.split(), "--threads",
                                                 str(args.threads), "--auto-truncate"]))
        # the single calls, the checks and the ceiling run the engine each server runs: its
        # backend and precision from /info (auto may pick another one in this process), one
        # engine per backend x precision
        kinds = [f"{info['backend']} {info['precision']}"
                 for info in (server_info(server.url) for server in servers)]
        by_kind: dict[str, InferenceEngine] = {}
        for kind in dict.fromkeys(kinds):
            backend, precision = kind.split()
            by_kind[kind] = InferenceEngine(model, threads=args.threads, backend=backend,
                                            precision=precision, streams=args.threads)
            engines.append(by_kind[kind])
        engine = by_kind[kinds[0]]
        expected = engine.embed(texts[:16])
        enc = engine.tokenizer(texts, padding=False, truncation=True,
                               max_length=engine.max_length)
        requests = [Request(i, t) for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
        lengths = [r.length for r in requests]
        checks = [check_outputs(s, label, texts[:16], expected)
                  for (label, _), s in zip(configs, servers)]

        def load(i: int, keep: bool = True, **kwargs: object) -> LoadPoint:
            one = run_load(servers[i].url, texts, label=configs[i][0], timeout=10,
                           log=(lambda line: print(line, file=sys.stderr)) if keep else None,
                           **kwargs)
            runs[i].url, runs[i].route, runs[i].info = one.url, one.route, one.info
            if keep:
                runs[i].points.extend(one.points)
            return one.points[-1]

        saturation = [load(i, concurrency=[16], duration=4.0).throughput
                      for i in range(len(configs))]
        # bisection of each configuration's rate between 0 and its saturation; each step's
        # rates run in --slices slices, round-robin over the configurations, and each pools
        # its slices: a burst of the machine's other work lands on every configuration
        # (up to 1.4x: with more requests waiting than 16 clients keep, an open loop's
        # batches are larger, and served 1.0-1.03x the closed loop's rate within the p99)
        low = [0.0] * len(configs)
        high = [s * TOP for s in saturation]
        for step in range(args.steps):
            rates = [round((lo + hi) / 2, 2) for lo, hi in zip(low, high)]
            parts: list[list[LoadPoint]] = [[] for _ in configs]
            for piece in range(args.slices):
                for i, rate in enumerate(rates):
                    seconds = min(max(args.duration, args.samples / rate),
                                  4 * args.duration) / args.slices
                    parts[i].append(load(i, rates=[rate], duration=seconds,
                                         seed=100 * step + piece, warmup=0, keep=False))
            for i, rate in enumerate(rates):
                point = pool(parts[i])
                runs[i].points.append(point)
                ok = within(parts[i], args.p99_ms)
                print(format_point(configs[i][0], point)
                      + f"; slices' p99 {', '.join(f'{p.percentile_ms(99):.0f}' for p in parts[i])}"
                      f" ms: {'within' if ok else 'over'}", file=sys.stderr)
                if ok:
                    low[i] = rate
                else:
                    high[i] = rate
        best_rate = [rate or None for rate in low]
        light_rate = round(0.1 * (best_rate[0] or saturation[0] * 0.3), 2)
        light_seconds = min(max(args.light_duration, 60 / light_rate), 3 * args.light_duration)
        # the light load beside a single unbatched call of the engine each server runs (its
        # backend x precision), arriving as the light load's requests do (and the default's
        # back to back, for reference): in --slices slices taken in turn, so the machine's
        # drift over the minutes this takes lands on the servers and the single calls alike
        sample = texts[:80]
        singles: dict[str, list[float]] = {kind: [] for kind in by_kind}
        singles[BACK_TO_BACK] = []
        light_parts: list[list[LoadPoint]] = [[] for _ in configs]
        for piece in range(args.slices):
            part = sample[piece::args.slices]
            for k, (kind, one) in enumerate(by_kind.items()):
                singles[kind] += single_calls(one, part, light_rate, seed=10 * k + piece)
            singles[BACK_TO_BACK] += single_calls(engine, part)
            for i in range(len(configs)):
                light_parts[i].append(load(i, rates=[light_rate],
                                           duration=light_seconds / args.slices,
                                           seed=99 + piece, warmup=0, keep=False))
        light = [pool(parts) for parts in light_parts]
        for i, point in enumerate(light):
            runs[i].points.append(point)
        # the ceiling no server of this engine passes: every text at once, length-sorted and
        # cut by the engine's budget, no HTTP, no load generator, no latency bound
        ceiling = len(texts) / min(time_interleaved([lambda: engine.embed(texts)], 2)[0])
        # and as the server's streams run them under load (one batch per core): the higher
        # of the two bounds the default server
        streamed = streamed_rate(engine, requests)
        floor_ms = http_floor(servers[0].url, light_rate)
    finally:
        for server in servers:
            server.stop()
        for one in engines:
            one.close()
    single = {k: float(np.median(v)) for k, v in singles.items()}
    anchor = best_rate[1]

    print()
    print(f"MiniLM-L6, {args.threads} model threads per server, {len(texts)} real texts "
          f"(docstrings; tokens median {np.median(lengths):.0f}, mean {np.mean(lengths):.0f}, "
          f"max {max(lengths)}), CPU {cpu_name()} ({os.cpu_count()} cores, shared; load "
          f"average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after), "
          f"{time.perf_counter() - started:.0f} s")
    print(f"single unbatched engine call, p50 over {len(sample)} texts arriving at the light "
          f"load's rate, in {args.slices} slices between the servers' light-load slices: "
          + "; ".join(f"{k} {single[k]:.1f} ms" for k in singles)
          + f"; light load {light_rate:g} req/s for {light_seconds:.0f} s a server")
    header = ("| configuration | check | saturation (16 clients) req/s | highest rate with "
              f"p99 <= {args.p99_ms:g} ms | x anchor | light-load p50 ms | x single call |")
    print(header)
    print("|" + "---|" * 7)
    for i, (label, extra) in enumerate(configs):
        rate = best_rate[i]
        ratio = f"{rate / anchor:.2f}" if rate and anchor else "-"
        p50 = light[i].percentile_ms(50)
        own = single[kinds[i]]
        print(f"| {label} | {checks[i]} | {saturation[i]:.1f} | "
              f"{capped(rate, saturation[i] * TOP, args.steps)} | {ratio} | {p50:.1f} | "
              f"{p50 / own:.2f} |")
    if why_not:
        print(f"| OpenVINO | {why_not} | | | | | |")
    if anchor:
        print(f"\noffline ceiling: the default engine ({engine.backend.description}) embeds "
              f"all {len(texts)} texts at once in length-sorted budget batches at "
              f"{ceiling:.1f} texts/s, {ceiling / anchor:.2f}x the anchor's highest rate"
              + (f"; on its {engine.streams} streams, a batch per core, at {streamed:.1f} "
                 f"texts/s, {streamed / anchor:.2f}x" if streamed else ""))
    print(f"HTTP floor: GET /health of the default server at the light rate, p50 "
          f"{floor_ms:.2f} ms (every request's round trip, client included: the single call "
          f"plus it is {(single[kinds[0]] + floor_ms) / single[kinds[0]]:.2f}x the single call)")
    print("light load, p50 by stage (the servers' timing headers; outside: the latency less "
          "the server's total): " + "; ".join(
              f"{label} {format_stages(point)} ms of {point.percentile_ms(50):.1f}"
              for (label, _), point in zip(configs, light)))
    if not args.markdown:
        print()
        from bertrt.serve.http.loadgen import format_table

        print(format_table(runs))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"single_call_ms": single, "light_rate": light_rate,
                       "best_rate": dict(zip([c[0] for c in configs], best_rate)),
                       "saturation": dict(zip([c[0] for c in configs], saturation)),
                       "offline_ceiling": ceiling, "offline_streams": streamed,
                       "http_floor_ms": floor_ms,
                       "runs": [r.to_dict() for r in runs]}, f, indent=2)
    if args.plot:
        plot(runs, args.plot, title=f"MiniLM-L6, {args.threads} threads, real texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
