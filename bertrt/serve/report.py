"""Measuring backends over a workload, and the report: a table and JSON.

`run_benchmark` drives workload → batcher → backends: per shape, one untimed batch through
every backend (on the first shape, before anything is timed, their outputs are cross-checked
(`bertrt.serve.crosscheck`) and the run stops with `BackendsDisagree` when they differ beyond
the bound), `warmup` untimed batches, then timed batches — backends interleaved on the same
batch (A B C A B C ...), so drift on a shared machine hits all of them alike. Latency is the
wall time of one `Backend.execute` (numpy outputs back on the host; the batch's inputs are
prepared (converted, bound) before the clock starts; batching and padding not included; no
queueing in this first, fixed-batch version).

Throughput is counted two ways: `tokens_per_s` counts real (non-padding) tokens,
`positions_per_s` counts padded positions (batch × padded length). They are equal when
nothing is padded (the synthetic workload).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bertrt.serve.backends import Backend, repad
from bertrt.serve.batcher import Batch, FixedBatcher
from bertrt.serve.crosscheck import (
    BackendsDisagree,
    cross_check,
    disagreeing,
    format_cross_check,
    max_abs_diff,
)
from bertrt.serve.workload import Shape, Workload

__all__ = ["Measurement", "Report", "max_abs_diff", "run_benchmark"]

PERCENTILES = (50, 90, 99)


@dataclass
class Measurement:
    """Timed batches of one backend on one shape."""

    backend: str
    shape: Shape
    latencies_s: list[float] = field(default_factory=list)
    sequences: int = 0
    tokens: int = 0
    positions: int = 0

    def add(self, seconds: float, batch: Batch, packed: bool = False) -> None:
        """One timed batch; a packed backend computes its real tokens only."""
        self.latencies_s.append(seconds)
        self.sequences += batch.size
        self.tokens += batch.tokens
        self.positions += batch.tokens if packed else batch.positions

    def row(self) -> dict[str, Any]:
        """The JSON row: counts, latency percentiles (ms), throughputs."""
        lat = np.asarray(self.latencies_s, dtype=np.float64)
        total = float(lat.sum())
        p50, p90, p99 = (float(np.percentile(lat, q)) * 1e3 for q in PERCENTILES)
        rate = 1.0 / total if total > 0 else 0.0
        return {
            "shape": self.shape.label, "batch_size": self.shape.batch_size,
            "seq_len": self.shape.seq_len, "backend": self.backend,
            "batches": int(lat.size), "sequences": self.sequences, "tokens": self.tokens,
            "positions": self.positions, "seconds": total,
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "mean_ms": float(lat.mean()) * 1e3, "min_ms": float(lat.min()) * 1e3,
            "max_ms": float(lat.max()) * 1e3,
            "sequences_per_s": self.sequences * rate, "tokens_per_s": self.tokens * rate,
            "positions_per_s": self.positions * rate,
        }


@dataclass
class Report:
    """Rows (one per backend × shape), the cross-check, and what was run."""

    rows: list[dict[str, Any]]
    cross_check: dict[str, Any]
    meta: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({**self.meta, "cross_check": self.cross_check, "rows": self.rows},
                          indent=2, default=_jsonable)

    def format_table(self) -> str:
        """Backends side by side for each shape, with throughput relative to the first."""
        head = (f"{'shape':<10} {'backend':<9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
                f"{'seq/s':>9} {'tok/s':>10} {'pos/s':>10} {'x ' + self.meta['backends'][0]:>8}")
        lines = [head, "-" * len(head)]
        first: dict[str, float] = {}
        for row in self.rows:
            shown = "" if row["shape"] in first else row["shape"]
            ref = first.setdefault(row["shape"], row["sequences_per_s"])
            ratio = row["sequences_per_s"] / ref if ref else float("nan")
            lines.append(
                f"{shown:<10} {row['backend']:<9} {row['p50_ms']:>9.2f} {row['p90_ms']:>9.2f} "
                f"{row['p99_ms']:>9.2f} {row['sequences_per_s']:>9.1f} "
                f"{row['tokens_per_s']:>10.0f} {row['positions_per_s']:>10.0f} {ratio:>8.2f}")
        lines.append("latency: one batch through the backend; tok/s: real (non-padding) tokens; "
                     "pos/s: padded positions (batch x padded length)")
        return "\n".join(lines)

    def format_header(self) -> str:
        m = self.meta
        lines = [f"serve-bench {m['model']}"]
        lines.extend(f"  {name}: {desc}" for name, desc in m["backend_descriptions"].items())
        w = m["workload"]
        what = ("synthetic random token ids, no padding" if w["kind"] == "synthetic" else
                f"{w['texts']} texts from {w['source']} (mean {w['mean_tokens']:.1f} tokens, "
                f"max_length {w['max_length']}), padded to the longest of each batch")
        timing = (f"{m['iters']} timed batches" if m["duration_s"] is None
                  else f"~{m['duration_s']:g} s of timed batches")
        pause = f" ({m['gap_s'] * 1e3:g} ms pause before each)" if m.get("gap_s") else ""
        lines.append(f"  workload: {what}; {m['warmup']} warm-up, then {timing} per shape, "
                     f"backends interleaved{pause}")
        lines.append("  " + format_cross_check(self.cross_check))
        return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON-able: {type(x).__name__}")


def run_benchmark(
    workload: Workload,
    backends: Sequence[Backend],
    *,
    warmup: int = 3,
    iters: int | None = 20,
    duration: float | None = None,
    pad_id: int = 0,
    meta: dict[str, Any] | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    gap: float = 0.0,
    stop_on_mismatch: bool = True,
) -> Report:
    """Time every backend on every shape of the workload; see the module docstring.

    Args:
        workload: Shapes and their requests.
        backends: At least one; the first is the cross-check's reference.
        warmup: Untimed batches per shape (after the cross-check batch).
        iters: Timed batches per shape (ignored when `duration` is given).
        duration: Time each shape for about this many seconds instead (all backends
            together, at least one batch each).
        pad_id: The `[PAD]` id the batcher pads with.
        meta: Extra fields for the report (model, threads, ...).
        progress: Show a tqdm bar on stderr (None: only on a terminal).
        log: Where the cross-check line goes as soon as it is known (e.g. stderr).
        gap: Pause (untimed) before every timed batch, seconds: lets the previous backend's
            idle threads (OpenMP or ONNX Runtime spinning) go to sleep, so they do not steal
            the cores of the next one when several backends share a small machine.
        stop_on_mismatch: Raise when the cross-check fails (False: time anyway and keep the
            failure in the report's `cross_check`).

    Raises:
        BackendsDisagree: the backends' outputs on the first batch differ beyond the bound
            (`bertrt.serve.crosscheck`); raised before any batch is timed.
    """
    from tqdm import tqdm

    if not backends:
        raise ValueError("run_benchmark: no backends")
    shapes = workload.shapes()
    names = [b.label for b in backends]
    if duration is None:
        total: float | None = len(shapes) * len(backends) * (1 + warmup + int(iters or 0))
        unit = "batch"
    else:
        total, unit = len(shapes) * float(duration), "s"
    # tqdm: disable=None shows the bar only when stderr is a terminal
    disable = None if progress is None else not progress
    bar = tqdm(total=total, unit=unit, desc="serve-bench", disable=disable, leave=False,
               dynamic_ncols=True)
    measurements: list[Measurement] = []
    cross: dict[str, Any] = {"reference": names[0], "results": {}}
    try:
        for index, shape in enumerate(shapes):
            stream = FixedBatcher(shape.batch_size, pad_id).batches(workload.requests(shape))
            first = next(stream)
            bar.set_postfix_str(f"{shape.label} check", refresh=False)
            outputs = _untimed(backends, first, lambda: _tick(bar, unit, None))
            if index == 0:
                cross = cross_check(outputs, backends, first.inputs["attention_mask"],
                                    shape.label)
                if log is not None:
                    log(format_cross_check(cross))
                if stop_on_mismatch and disagreeing(cross):
                    raise BackendsDisagree(cross)
            for _ in range(warmup):
                _untimed(backends, next(stream), lambda: _tick(bar, unit, None))
            bar.set_postfix_str(shape.label, refresh=False)
            per = _time_shape(backends, shape, stream, iters, duration, gap,
                              lambda dt: _tick(bar, unit, dt))
            measurements.extend(per[n] for n in names)
    finally:
        bar.close()
    meta = dict(meta or {})
    meta.update(backends=names, warmup=warmup, iters=None if duration is not None else iters,
                duration_s=duration, gap_s=gap, workload=workload.describe(),
                backend_descriptions={b.label: b.description for b in backends},
                machine={"platform": platform.platform(), "processor": platform.processor(),
                         "python": platform.python_version()})
    meta.setdefault("model", "?")
    return Report([m.row() for m in measurements], cross, meta)


def _untimed(backends: Sequence[Backend], batch: Batch,
             tick: Callable[[], None]) -> dict[str, dict[str, np.ndarray]]:
    """One batch through every backend, not timed; their outputs by backend name."""
    outputs = {}
    for backend in backends:
        out = backend.run(batch.inputs)
        if backend.packed:  # compared position by position with the padded ones
            out = repad(out, batch.inputs["attention_mask"], backend.token_outputs)
        outputs[backend.label] = out
        tick()
    return outputs


def _time_shape(backends: Sequence[Backend], shape: Shape, stream: Iterator[Batch],
                iters: int | None, duration: float | None, gap: float,
                tick: Callable[[float], None]) -> dict[str, Measurement]:
    """The timed rounds of one shape: each round one new batch through every backend."""
    per = {b.label: Measurement(b.label, shape) for b in backends}
    start, rounds = time.perf_counter(), 0
    while True:
        batch = next(stream)
        for backend in backends:
            prepared = backend.prepare(batch.inputs)  # feeds, bindings: not timed
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            backend.execute(prepared)
            dt = time.perf_counter() - t0
            per[backend.label].add(dt, batch, backend.packed)
            tick(dt)
        rounds += 1
        if duration is None:
            if rounds >= int(iters or 1):
                return per
        elif time.perf_counter() - start >= duration:
            return per


def _tick(bar: Any, unit: str, timed_s: float | None) -> None:
    """Advance the bar: one batch, or (duration mode) the seconds of a timed batch."""
    if unit == "s":
        if timed_s is not None:
            bar.update(timed_s)
    else:
        bar.update(1)
