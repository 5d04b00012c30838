"""The residual add + LayerNorm on ONNX Runtime's CPU: its SkipLayerNormalization contrib op
against core Add + LayerNormalization, the form bertrt's `ort` flavour writes from opset 17.

Two measurements, one process, interleaved rounds:

- **the op alone**: one node on (rows, H) float32 rows, one thread: SkipLayerNormalization
  (with its bias input, as bertrt wrote it) against Add + Add + LayerNormalization;
- **the model**: MiniLM-L6 exported in the `ort` flavour at opset 13 (where there is no core
  LayerNormalization, so SKIP_LAYER_NORM becomes the contrib op: the file bertrt wrote before)
  and at opset 17 (the core form), packed and padded, run by `OrtBackend` (which keeps ONNX
  Runtime from fusing the core form back) on real texts in arrival-order batches, on 1 and 2
  threads. The two files' embeddings are checked to agree within 1e-4 first.

    python tools/bench_layer_norm.py [--texts 400] [--batch 4] [--rounds 5] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_packed import real_texts  # the script's folder
from bench_torch import minilm_dir, time_interleaved


def op_alone(rows: int, hidden: int, rounds: int) -> tuple[float, float]:
    """Median microseconds of the contrib op and of the core form on (rows, hidden)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bertrt.serve.backends import OrtBackend

    def session(nodes: list, opset: int) -> ort.InferenceSession:
        shape = ["rows", hidden]
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "xs"]
        rng = np.random.default_rng(0)
        weights = [numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), n)
                   for n in ("gamma", "beta", "bias")]
        graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, shape)], weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid("com.microsoft", 1)])
        onnx.checker.check_model(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(OrtBackend.disabled_optimizers))

    contrib = session([helper.make_node("SkipLayerNormalization",
                                        ["x", "s", "gamma", "beta", "bias"], ["y"],
                                        domain="com.microsoft", epsilon=1e-12)], 17)
    core = session([helper.make_node("Add", ["x", "bias"], ["xb"]),
                    helper.make_node("Add", ["xb", "s"], ["sum"]),
                    helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"],
                                     axis=-1, epsilon=1e-12, stash_type=1)], 17)
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((rows, hidden)).astype(np.float32) for n in "xs"}
    want, got = (s.run(None, feeds)[0] for s in (contrib, core))
    assert np.abs(want - got).max() < 1e-4, "the two forms disagree"
    def calls(s: ort.InferenceSession) -> Callable[[], None]:
        return lambda: [s.run(None, feeds) for _ in range(200)]

    times = time_interleaved([calls(contrib), calls(core)], rounds)
    return statistics.median(times[0]) / 200 * 1e6, statistics.median(times[1]) / 200 * 1e6


def model_runs(texts: list[str], batch: int, rounds: int, tmp: Path
               ) -> list[tuple[str, int, float, float]]:
    """(layout, threads, contrib ms, core ms) per layout and thread count: medians of the
    whole text list run in `batch`-sized arrival-order batches."""
    from bertrt import Model
    from bertrt.serve.backends import OrtBackend
    from bertrt.serve.workload import Request

    model = Model.load(minilm_dir())
    enc = model.tokenizer(texts, padding=False, truncation=True, max_length=256)
    requests = [Request(np.asarray(i, np.int64), np.asarray(t, np.int64))
                for i, t in zip(enc["input_ids"], enc["token_type_ids"])]
    batches = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    rows = []
    for packed in (True, False):
        files = [model.export_onnx(tmp / f"{packed}-{opset}.onnx", flavour="ort",
                                   packed=packed, opset=opset, head="none")
                 for opset in (13, 17)]
        for threads in (1, 2):
            backends = [OrtBackend(f, threads=threads) for f in files]

            def run(backend: OrtBackend) -> Callable[[], np.ndarray]:
                return lambda: np.concatenate([backend.run_sequences(b).pool(
                    "last_hidden_state", "mean") for b in batches])

            fns = [run(b) for b in backends]
            first = [fn() for fn in fns]  # also the warm-up
            assert np.abs(first[0] - first[1]).max() < 1e-4, "the two exports disagree"
            times = time_interleaved(fns, rounds)
            rows.append(("packed" if packed else "padded", threads,
                         statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4, help="texts per batch [4]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    contrib_us, core_us = op_alone(300, 384, args.rounds)
    print(f"onnxruntime {ort.__version__}; the op alone on (300, 384), 1 thread: "
          f"SkipLayerNormalization {contrib_us:.1f} us, Add + LayerNormalization "
          f"{core_us:.1f} us ({contrib_us / core_us:.2f}x)")
    with tempfile.TemporaryDirectory(prefix="bertrt-ln-") as tmp:
        rows = model_runs(real_texts(args.texts), args.batch, args.rounds, Path(tmp))
    print(f"MiniLM-L6, {args.texts} real texts in batches of {args.batch}, median of "
          f"{args.rounds} rounds:")
    bar = "|" if args.markdown else ""
    print(f"{bar} layout {bar} threads {bar} SkipLayerNormalization ms {bar} Add + "
          f"LayerNormalization ms {bar} speed-up {bar}")
    if args.markdown:
        print("|---|---|---|---|---|")
    for layout, threads, contrib, core in rows:
        print(f"{bar} {layout} {bar} {threads} {bar} {contrib:.0f} {bar} {core:.0f} {bar} "
              f"{contrib / core:.3f}x {bar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
