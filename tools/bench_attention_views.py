"""The packed export's attention on views grouped by length, against one view padded to the
batch's longest (what the export wrote before), on real text.

A packed batch runs its token-wise work on the real tokens, but its attention core on padded
views. With one view every sequence pads to the batch's longest: arrival-order batches of
real text (a few long texts among many short ones) then compute ~3x (~120 tokens a batch) to
~8x (~600) the score positions they need. The export now writes `ATTENTION_VIEWS` (3) views,
each sequence in the one of its length (more than half the longest, more than a quarter, the
rest). This times MiniLM-L6 exported both ways (packed, `head="none"`) on arrival-order
batches cut at several token budgets, one process, interleaved rounds, on:

- ONNX Runtime (`ort` flavour, `OrtBackend`), 1 thread (a server's streams) and 2;
- OpenVINO (`standard` flavour), fp32 and bf16 (where the CPU has bf16 units), 2 threads,
  where it is installed.

With `--sorted`, the texts are sorted by length first, as `InferenceEngine.embed` sorts a
chunk before cutting its batches: the views' adverse case, where a batch's sequences are
alike and there is no padding to skip. `--runtime` keeps the runtimes whose label holds it.

The two files' outputs are checked to agree first (fp32: 1e-4; bf16: cosine 0.999). Batches of
one sequence are left out: the engine runs those on its padded twin. About 12 minutes on 2
cores (OpenVINO compiles each new shape once).

    python tools/bench_attention_views.py [--texts 500] [--budgets 60,120,300,600,1000]
                                          [--rounds 3] [--sorted] [--runtime onnxruntime]
                                          [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from bench_packed import real_texts  # the script's folder
from bench_torch import minilm_dir, time_interleaved


@contextlib.contextmanager
def views(n: int) -> Iterator[None]:
    """Export with `n` attention views."""
    from bertrt.lower import to_onnx

    kept = to_onnx.ATTENTION_VIEWS
    to_onnx.ATTENTION_VIEWS = n
    try:
        yield
    finally:
        to_onnx.ATTENTION_VIEWS = kept


def budget_batches(requests: list, budget: int) -> list[list]:
    """Consecutive requests (in arrival order, or sorted), each batch closed once it holds
    `budget` real tokens; batches of one sequence dropped."""
    batches, batch, tokens = [], [], 0
    for request in requests:
        batch.append(request)
        tokens += request.length
        if tokens >= budget:
            batches.append(batch)
            batch, tokens = [], 0
    return [b for b in batches if len(b) > 1]


def backends() -> list[tuple[str, Callable[[Path], object], str]]:
    """(label, backend from a file, flavour) for each runtime x setting to time."""
    from bertrt.serve.backends import OrtBackend

    runs: list[tuple[str, Callable[[Path], object], str]] = [
        (f"onnxruntime, {t} thread{'s' * (t > 1)}",
         lambda f, t=t: OrtBackend(f, threads=t), "ort") for t in (1, 2)]
    try:
        from bertrt.serve.backends import OpenVinoBackend, import_openvino, native_bf16

        import_openvino()
    except Exception as exc:  # not installed: say so and time the rest
        print(f"openvino: skipped ({exc})")
        return runs
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not native_bf16():
            print("openvino bf16: skipped (this CPU has no native bf16)")
            continue
        runs.append((f"openvino {precision}, 2 threads",
                     lambda f, p=precision: OpenVinoBackend(f, threads=2, precision=p),
                     "standard"))
    return runs


def measure(texts: list[str], budgets: list[int], rounds: int, by_length: bool = False,
            only: str = "") -> Iterator[tuple[str, int, float, float, float]]:
    """(runtime, budget, sequences a batch, one-view ms, views ms) per runtime x budget, as
    each is measured: medians of the whole list of batches."""
    from bertrt import Model
    from bertrt.lower.to_onnx import ATTENTION_VIEWS
    from bertrt.serve.workload import Request

    model = Model.load(minilm_dir())
    enc = model.tokenizer(texts, padding=False, truncation=True, max_length=256)
    requests = [Request(np.asarray(i, np.int64), np.asarray(t, np.int64))
                for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
    if by_length:
        requests.sort(key=lambda r: r.length)
    runtimes = [run for run in backends() if only in run[0]]
    with tempfile.TemporaryDirectory(prefix="bertrt-views-") as tmp:
        files = {}
        for flavour in dict.fromkeys(run[2] for run in runtimes):  # the flavours they run
            for n in (1, ATTENTION_VIEWS):
                with views(n):
                    files[flavour, n] = model.export_onnx(
                        Path(tmp) / f"{flavour}-{n}.onnx", flavour=flavour, packed=True,
                        head="none")
        for label, make, flavour in runtimes:
            pair = [make(files[flavour, 1]), make(files[flavour, ATTENTION_VIEWS])]
            for budget in budgets:
                batches = budget_batches(requests, budget)

                def run(backend: object, batches: list = batches) -> Callable[[], np.ndarray]:
                    return lambda: np.concatenate([backend.run_sequences(b).pool(
                        "last_hidden_state", "mean") for b in batches])

                fns = [run(b) for b in pair]
                one, grouped = (fn() for fn in fns)  # also the warm-up (OpenVINO compiles)
                if "bf16" in label:
                    cos = (one * grouped).sum(1) / (np.linalg.norm(one, axis=1)
                                                    * np.linalg.norm(grouped, axis=1))
                    assert cos.min() > 0.999, f"{label}: the two exports disagree"
                else:
                    assert np.abs(one - grouped).max() < 1e-4, f"{label}: the exports disagree"
                times = time_interleaved(fns, rounds)
                yield (label, budget, float(np.mean([len(b) for b in batches])),
                       statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--budgets", default="60,120,300,600,1000",
                        help="real tokens a batch, comma-separated [60,120,300,600,1000]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sorted", action="store_true",
                        help="sort the texts by length before cutting batches (as "
                             "InferenceEngine.embed does)")
    parser.add_argument("--runtime", default="",
                        help="only the runtimes whose label holds this, e.g. onnxruntime")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    from bertrt.lower.to_onnx import ATTENTION_VIEWS

    budgets = [int(b) for b in args.budgets.split(",")]
    order = "length-sorted" if args.sorted else "arrival-order"
    print(f"MiniLM-L6, {args.texts} real texts in {order} batches, median of "
          f"{args.rounds} rounds; {ATTENTION_VIEWS} views against one:")
    bar = "|" if args.markdown else ""
    cells = ["runtime", "tokens a batch", "sequences a batch", "one view ms", "views ms",
             "speed-up"]
    print(f"{bar} {f' {bar} '.join(cells)} {bar}".strip())
    if args.markdown:
        print("|" + "---|" * len(cells))
    for label, budget, size, one, grouped in measure(real_texts(args.texts), budgets,
                                                     args.rounds, args.sorted, args.runtime):
        cells = [label, f"~{budget}", f"{size:.1f}", f"{one:.0f}", f"{grouped:.0f}",
                 f"{one / grouped:.3f}x"]
        print(f"{bar} {f' {bar} '.join(cells)} {bar}".strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
