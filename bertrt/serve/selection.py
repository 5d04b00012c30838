"""Which backend runs which precision, and `backend="auto"`: the fastest that meets a gate.

Each precision is held to an accuracy gate against fp32, tested on MiniLM over 500 real texts
(mean-pooled embeddings, the smallest cosine): fp32 exact (within 1e-4 of the reference), bf16
and fp16 ≥ 0.999, int8 ≥ 0.99 (`tests/onnx/test_int8.py`, `tests/serve/test_openvino.py`).
With `backend="auto"`, `precision` names the loosest gate the caller accepts: "fp32" (the
default) admits fp32 only, "bf16" admits fp32 and bf16, "int8" all three. Among the CPU
backends installed and the precisions this CPU runs natively, the engine starts every admitted
pair, times each on two probe shapes (a batch of mixed lengths and a 16-token query), keeps the
fastest and says so (`InferenceEngine.trials`, its `description`). One candidate is started
without timing; the choice is remembered for the process, per model file and settings.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bertrt.serve.workload import Request

if TYPE_CHECKING:
    from bertrt.serve.backends import Backend

#: The precisions each backend runs (fp16: an `--fp16` export, on CUDA only; bf16: OpenVINO's
#: bf16 inference precision on an fp32 export, where the CPU has native bf16).
RUNS: dict[str, tuple[str, ...]] = {
    "ort": ("fp32", "int8"),
    "ort-cuda": ("fp32", "fp16"),
    "openvino": ("fp32", "bf16"),
    "torch": ("fp32",),
}
#: How close each precision stays to fp32: a caller asking for one accepts any at least as
#: close.
ACCURACY: dict[str, int] = {"fp32": 2, "bf16": 1, "fp16": 1, "int8": 0}
#: The CPU backends `auto` considers, in the order ties are broken (torch only when neither
#: ONNX runtime is installed: it is the slowest on a CPU).
AUTO_BACKENDS: tuple[str, ...] = ("ort", "openvino")

#: Probe shapes: a batch of mixed lengths (short-heavy, as real text is) and one query.
PROBE_BATCH = 24
PROBE_QUERY = 16
PROBE_REPEATS = 3


@dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass(frozen=True)
class Trial:
    """One timed candidate: the median of `PROBE_REPEATS` runs of each probe."""

    candidate: Candidate
    batch_ms: float
    query_ms: float

    @property
    def score(self) -> float:
        return self.batch_ms + self.query_ms

    def __str__(self) -> str:
        return f"{self.candidate} {self.batch_ms:.1f}+{self.query_ms:.1f} ms"


def installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def auto_candidates(precision: str, file_precision: str | None = None,
                    file_flavour: str | None = None) -> list[Candidate]:
    """The (backend, precision) pairs `auto` may pick for a caller asking for `precision`.

    Args:
        precision: The loosest precision accepted.
        file_precision: For an `.onnx` file, what it holds ("fp32", "int8", "fp16"): only
            what runs it is admitted (an fp32 file runs at fp32, or bf16 on OpenVINO).
        file_flavour: For an `.onnx` file, its flavour ("ort" files hold com.microsoft ops,
            which only ONNX Runtime reads).
    """
    from bertrt.serve.backends import native_bf16

    have = [b for b in AUTO_BACKENDS if installed("onnxruntime" if b == "ort" else b)]
    if file_flavour == "ort" and "openvino" in have:
        have.remove("openvino")
    if not have and file_precision is None:
        have = ["torch"]
    out = []
    for backend in have:
        for p in RUNS[backend]:
            if ACCURACY[p] < ACCURACY[precision] or p == "fp16":
                continue
            if file_precision is not None and p != file_precision and not (
                    file_precision == "fp32" and p == "bf16"):
                continue
            if p == "bf16" and not native_bf16():
                continue
            out.append(Candidate(backend, p))
    return out


#: The backends that load a narrow backend (`Backend.narrow`) for a server's streams.
STREAMS: tuple[str, ...] = ("ort", "openvino")


def with_streams(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates a loaded server (`streams` > 1) chooses among: at a precision ONNX
    Runtime runs, ONNX Runtime with its streams (`Backend.narrow`); precisions only another
    backend runs (bf16 on OpenVINO, with OpenVINO's streams) stay.

    A probe on idle cores cannot see what a server's load does to each (MiniLM, 2-core AMD
    EPYC, paired servers): ONNX Runtime's streams held 163 against 133 req/s within p99 <=
    250 ms over OpenVINO fp32 on one stream. With OpenVINO's own fp32 streams the two came
    out even under load (highest rate 2.15-2.35x against 2.00-2.28x the anchor's, three runs
    of tools/bench_serve.py), and a lone request ran slower on OpenVINO (light-load p50
    7.7-8.4 against 6.9-7.5 ms): ONNX Runtime stays, `--backend openvino` is a choice.
    """
    def onnxruntime_runs(precision: str) -> bool:
        return Candidate("ort", precision) in candidates

    return [c for c in candidates if c.backend == "ort" or not onnxruntime_runs(c.precision)]


def probe_requests(vocab_size: int, first_id: int, max_length: int, seed: int = 0
                   ) -> tuple[list[Request], list[Request]]:
    """The two probe shapes as token ids: `PROBE_BATCH` sequences of mixed lengths (up to
    128) and one `PROBE_QUERY`-token query."""
    rng = np.random.default_rng(seed)
    top = max(2, min(128, max_length))
    lengths = np.clip(rng.geometric(1 / 40, PROBE_BATCH) + 4, 2, top)

    def request(n: int) -> Request:
        ids = rng.integers(first_id, vocab_size, int(n)).astype(np.int64)
        return Request(ids, np.zeros_like(ids))

    return [request(n) for n in lengths], [request(min(PROBE_QUERY, top))]


def time_backend(backend: Backend, batch: list[Request], query: list[Request], pad_id: int,
                 streams: int = 1) -> tuple[float, float]:
    """Median milliseconds of each probe, after one untimed run: the batch as the engine would
    run it on this backend (longest first, cut by the backend's `batch_tokens`), the query in
    one `run_sequences`. With `streams` > 1 and a narrow session (`Backend.narrow`), the
    batch as a loaded server runs it: cut `streams` times finer and shared among `streams`
    threads on the narrow session at once."""
    from bertrt.serve.engine import length_sorted_batches

    narrow = backend.narrow if streams > 1 else None
    lengths = np.array([r.length for r in batch])
    budget = backend.batch_tokens if narrow is None else max(1, backend.batch_tokens // streams)
    parts = [[batch[i] for i in picked] for picked in
             length_sorted_batches(lengths, budget, backend.packed)]

    def run_parts(runner: Backend, mine: list[list[Request]]) -> None:
        for part in mine:
            runner.run_sequences(part, pad_id)

    with ThreadPoolExecutor(streams) as pool:  # started once, outside the timed runs
        def run_batch() -> None:
            if narrow is None:
                run_parts(backend, parts)
                return
            shares = [pool.submit(run_parts, narrow, parts[i::streams])
                      for i in range(streams)]
            for share in shares:
                share.result()

        out = []
        for probe in (run_batch, lambda: backend.run_sequences(query, pad_id)):
            probe()
            times = []
            for _ in range(PROBE_REPEATS):
                start = time.perf_counter()
                probe()
                times.append(time.perf_counter() - start)
            out.append(statistics.median(times) * 1e3)
    return out[0], out[1]


#: Choices made in this process: (model key, precision, packed, threads) -> the winner.
_CHOSEN: dict[tuple, Candidate] = {}


def remembered(key: tuple | None) -> Candidate | None:
    return None if key is None else _CHOSEN.get(key)


def remember(key: tuple | None, choice: Candidate) -> None:
    if key is not None:
        _CHOSEN[key] = choice


__all__ = ["ACCURACY", "AUTO_BACKENDS", "Candidate", "RUNS", "Trial", "auto_candidates",
           "STREAMS", "probe_requests", "time_backend", "with_streams"]
