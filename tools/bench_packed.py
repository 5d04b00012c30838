"""Padding-free (packed) inference against ONNX Runtime's optimizer, on real text.

Real texts are mostly short: a server that pads each batch to its longest text computes mostly
padding. This benchmark embeds a mix of short and long texts from the standard library's
docstrings (bertrt's embedded corpus), truncated at 128 and at 256 tokens, with MiniLM-L6, all
on ONNX Runtime's CPU provider in one process, 2 threads, interleaved rounds:

- `ort-opt arrival`: `torch.onnx.export` of transformers' BertModel + ONNX Runtime's
  transformers optimizer (the best plain path a user has), fixed batches of 32 in arrival
  order, each padded to its longest text — the live-traffic case;
- `ort-opt sorted`: the same model on length-sorted batches of 32 (the best a careful user
  does by hand, offline);
- `bertrt packed`: bertrt's packed export (`export_onnx(packed=True)`), the same arrival-order
  batches of 32, no padding computed;
- `bertrt packed int8`: the packed export with int8 weight products (`int8=True`);
- `engine ...`: what users call, `InferenceEngine.embed(texts)` on the whole list (it sorts
  each chunk by length and cuts batches by its token budget), per backend x precision:
  ONNX Runtime fp32 and int8, OpenVINO fp32 and (where the CPU has native bf16) bf16, and
  `backend="auto"` at the fp32 gate (the default: what a user gets) and at the bf16 gate.

Before timing, the packed embeddings (mean-pooled) are checked against the padded ones (fp32:
within 1e-4; reduced precisions report their cosine to fp32). Then batch-1 latency on a single
16-token query. Prints sequences/s and ratios.

    python tools/bench_packed.py [--texts 512] [--rounds 3] [--lengths 128,256] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_onnx import export_ort_optimized  # the script's folder
from bench_torch import minilm_dir

#: Seconds of idling before each timed system (ONNX Runtime's and OpenVINO's threads stop
#: spinning by then).
SETTLE_S = 0.2


def real_texts(n: int, seed: int = 0) -> list[str]:
    """`n` texts from the docstring corpus: 1 to ~12 sentences each (mostly short), in a
    seeded arrival order."""
    from bertrt.train.corpus import embedded_corpus, read_documents

    corpus = embedded_corpus(Path(tempfile.mkdtemp(prefix="bertrt-bench-")), max_bytes=2_000_000)
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for doc in read_documents(corpus):
        start = 0
        while start < len(doc) and len(texts) < n:
            k = int(min(rng.geometric(0.35), 12))
            texts.append(" ".join(doc[start:start + k]))
            start += k
        if len(texts) >= n:
            break
    rng.shuffle(texts)
    return texts


def session(path: Path, threads: int):
    import onnxruntime as ort

    from bertrt.serve.backends import OrtBackend

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(OrtBackend.disabled_optimizers))


def padded_runner(sess, rows: list[np.ndarray], batches: list[list[int]]):
    from bertrt.padding import length_mask, pad_rows

    feeds = []
    for batch in batches:
        chunk = [rows[i] for i in batch]
        ids = pad_rows(chunk)
        mask = length_mask([len(r) for r in chunk], ids.shape[1]).astype(np.int64)
        feeds.append((batch, {"input_ids": ids, "attention_mask": mask,
                              "token_type_ids": np.zeros_like(ids)}))

    def run() -> np.ndarray:
        out = np.empty((len(rows), 384), np.float32)
        for batch, feed in feeds:
            hidden = sess.run(["last_hidden_state"], feed)[0]
            m = feed["attention_mask"][..., None]
            out[batch] = (hidden * m).sum(1) / m.sum(1)
        return out

    return run


def packed_runner(sess, rows: list[np.ndarray], batches: list[list[int]]):
    from bertrt.padding import pack_rows

    feeds = []
    for batch in batches:
        flat, cu = pack_rows([rows[i] for i in batch])
        feeds.append((batch, cu, {"input_ids": flat, "cu_seqlens": cu,
                                  "token_type_ids": np.zeros_like(flat)}))

    def run() -> np.ndarray:
        out = np.empty((len(rows), 384), np.float32)
        for batch, cu, feed in feeds:
            hidden = sess.run(["last_hidden_state"], feed)[0]  # (T, H)
            out[batch] = np.add.reduceat(hidden, cu[:-1], axis=0) / np.diff(cu)[:, None]
        return out

    return run


def batch1_latency(systems: dict[str, object], rounds: int = 5, calls: int = 10,
                   warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each system, timed in blocks: per round, each system in turn
    (the order rotated every round) runs `warmup` calls and then `calls` timed ones, back to
    back, after `SETTLE_S` of idling. Not call by call: ONNX Runtime's and OpenVINO's worker
    threads spin for a while after a run, and with every system's threads in one process, the
    one that ran last keeps cores the next one needs (interleaved call by call, whichever
    spins last looks up to 3x faster than the same graph in another session; without the
    settle, the engine's block measured 6.08 ms in one run and 4.21 ms with it in the next)."""
    names = list(systems)
    lat: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = systems[name]
            time.sleep(SETTLE_S)  # the previous block's pool threads go idle
            for _ in range(warmup):
                run()
            for _ in range(calls):
                t0 = time.perf_counter()
                run()
                lat[name].append(time.perf_counter() - t0)
    return lat


def matmul_peaks(threads: int, m: int = 2048, k: int = 384, n: int = 1536,
                 repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of one ONNX Runtime MatMul, fp32 (`MatMul`) and int8 (`MatMulInteger`, uint8
    activations x int8 weights, as the dynamic int8 export runs), at MiniLM's FFN shape over
    `m` tokens: the peaks the model's products are measured against."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = {}
    for kind in ("fp32", "int8"):
        if kind == "fp32":
            a = rng.standard_normal((m, k)).astype(np.float32)
            w = rng.standard_normal((k, n)).astype(np.float32)
            node = helper.make_node("MatMul", ["a", "w"], ["y"])
            a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
        else:
            a = rng.integers(0, 255, (m, k)).astype(np.uint8)
            w = rng.integers(-127, 127, (k, n)).astype(np.int8)
            node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
            a_type, y_type = TensorProto.UINT8, TensorProto.INT32
        graph = helper.make_graph([node], kind, [helper.make_tensor_value_info("a", a_type,
                                                                               [m, k])],
                                  [helper.make_tensor_value_info("y", y_type, [m, n])],
                                  [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        path = Path(tempfile.mkdtemp(prefix="bertrt-peak-")) / f"{kind}.onnx"
        onnx.save(model, str(path))
        sess = session(path, threads)
        sess.run(None, {"a": a})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, {"a": a})
            times.append(time.perf_counter() - t0)
        out[kind] = 2 * m * k * n / min(times) / 1e9
    return out


def linear_flops(model, lengths: np.ndarray) -> float:
    """The multiply-adds x 2 of the encoder's weight products (QKV, attention output, FFN) and
    of its attention cores, over sequences of `lengths` (each attending to itself only)."""
    c = model.config
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    per_token = 2 * (3 * h * h + h * h + 2 * h * inter)
    attention = 2 * 2 * h * float((lengths.astype(np.float64) ** 2).sum())
    return layers * (per_token * float(lengths.sum()) + attention)


def engine_runner(engine, texts: list[str]):
    def run() -> np.ndarray:
        return engine.embed(texts, pooling="mean", normalize=False)

    return run


def engines(model_dir: Path, threads: int, limit: int) -> dict[str, object]:
    """The engines to time, by row name: each backend x precision this machine runs."""
    from bertrt.serve import InferenceEngine
    from bertrt.serve.backends import native_bf16
    from bertrt.serve.selection import installed

    kinds = [("ort", "fp32"), ("ort", "int8")]
    if installed("openvino"):
        kinds.append(("openvino", "fp32"))
        if native_bf16():
            kinds.append(("openvino", "bf16"))
    out = {f"engine {b} {p}": InferenceEngine(model_dir, backend=b, precision=p,
                                              threads=threads, max_length=limit)
           for b, p in kinds}
    # what a user gets by default (the fp32 gate), and with bf16 admitted
    for gate in ("fp32", "bf16"):
        auto = InferenceEngine(model_dir, backend="auto", precision=gate, threads=threads,
                               max_length=limit)
        out[f"engine auto ({gate} gate: {auto.backend_name} {auto.precision})"] = auto
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="128,256")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    import bertrt

    model_dir = minilm_dir()
    model = bertrt.load(model_dir, head="none")
    tmp = Path(tempfile.mkdtemp(prefix="bertrt-bench-"))
    ort_opt, _ = export_ort_optimized(model_dir, tmp)
    packed = model.export_onnx(tmp / "packed.onnx", flavour="ort", packed=True)
    packed8 = model.export_onnx(tmp / "packed8.onnx", flavour="standard", packed=True,
                                int8=True)
    sessions = {name: session(p, args.threads) for name, p in
                (("opt", ort_opt), ("packed", packed), ("packed8", packed8))}
    texts = real_texts(args.texts)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
               "unknown CPU")
    print(f"MiniLM-L6, {len(texts)} docstring texts, {args.threads} threads, {cpu}, "
          f"onnxruntime CPU; seq/s (median of {args.rounds} interleaved rounds)")
    peaks = matmul_peaks(args.threads)
    print(f"ONNX Runtime MatMul peaks ({args.threads} threads, 2048x384x1536): fp32 "
          f"{peaks['fp32']:.1f} GFLOP/s, int8 {peaks['int8']:.1f} GOP/s "
          f"({peaks['int8'] / peaks['fp32']:.2f}x)")
    rows_out = []
    running = engines(model_dir, args.threads, max(int(x) for x in args.lengths.split(",")))
    for limit in (int(x) for x in args.lengths.split(",")):
        enc = model.tokenizer(texts, max_length=limit, padding=False)
        rows = list(enc["input_ids"])
        lengths = np.array([len(r) for r in rows])
        arrival = [list(range(i, min(i + 32, len(rows)))) for i in range(0, len(rows), 32)]
        order = np.argsort(lengths, kind="stable")
        ordered = [list(order[i:i + 32]) for i in range(0, len(rows), 32)]
        padded_positions = sum(32 * lengths[b].max() for b in arrival)
        systems = {
            "ort-opt arrival": padded_runner(sessions["opt"], rows, arrival),
            "ort-opt sorted": padded_runner(sessions["opt"], rows, ordered),
            "bertrt packed": packed_runner(sessions["packed"], rows, arrival),
            "bertrt packed sorted": packed_runner(sessions["packed"], rows, ordered),
            "bertrt packed int8": packed_runner(sessions["packed8"], rows, arrival),
        }
        for engine in running.values():
            engine.max_length = limit
        systems.update({name: engine_runner(e, texts) for name, e in running.items()})
        ref = systems["ort-opt arrival"]()
        cosines = {}
        for name, run in systems.items():
            if name == "ort-opt arrival":
                continue
            got = run()
            cosines[name] = float(((got * ref).sum(1) / np.linalg.norm(got, axis=1)
                                   / np.linalg.norm(ref, axis=1)).min())
            exact = "int8" not in name and "bf16" not in name
            diff = float(np.abs(got - ref).max())
            assert not exact or diff < 1e-4, f"{name}: embeddings differ from fp32 by {diff}"
        cosine = np.array([cosines["bertrt packed int8"]])
        times: dict[str, list[float]] = {k: [] for k in systems}
        for _ in range(args.rounds):
            for name, run in systems.items():
                # the previous system's pool threads spin on for a while after its last run:
                # let them go idle, or the next system shares its cores with them
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["ort-opt arrival"])
        sorted_base = statistics.median(times["ort-opt sorted"])
        packed_base = statistics.median(times["engine ort fp32"])
        print(f"\ntruncated at {limit}: mean length {lengths.mean():.1f}, padding "
              f"{1 - lengths.sum() / padded_positions:.0%} of arrival-order positions; int8 "
              f"cosine to fp32 min {cosine.min():.4f}")
        flops = linear_flops(model, lengths)
        for name, ts in times.items():
            t = statistics.median(ts)
            if name in ("bertrt packed", "bertrt packed int8"):
                peak = peaks["int8" if "int8" in name else "fp32"]
                print(f"  {name}: {flops / t / 1e9:.1f} GFLOP/s of weight and attention "
                      f"products, {flops / t / 1e9 / peak:.0%} of the "
                      f"{'int8' if 'int8' in name else 'fp32'} MatMul peak")
            row = dict(limit=limit, system=name, seq_s=len(rows) / t, vs_arrival=base / t,
                       vs_sorted=sorted_base / t, vs_packed=packed_base / t,
                       cosine=cosines.get(name, 1.0))
            rows_out.append(row)
            print(f"  {name:40s} {row['seq_s']:8.1f} seq/s  {row['vs_arrival']:5.2f}x arrival"
                  f"  {row['vs_sorted']:5.2f}x sorted  {row['vs_packed']:5.2f}x engine ort "
                  f"fp32  min cosine {row['cosine']:.4f}")

    # batch-1 latency: one 16-token query
    rng = np.random.default_rng(1)
    query = [np.concatenate([[101], rng.integers(1000, 20000, 14), [102]])]
    one = {"ort-opt": padded_runner(sessions["opt"], query, [[0]]),
           "bertrt packed export": packed_runner(sessions["packed"], query, [[0]])}
    from bertrt.serve.workload import Request

    request = [Request(query[0], np.zeros_like(query[0]))]
    for name, engine in running.items():  # the engine's path for one sequence (its twin)
        one[name] = (lambda e=engine: e.backend.run_sequences(request, 0))
    lat = batch1_latency(one)
    base = statistics.median(lat["ort-opt"])
    print("\nbatch 1 x 16 tokens (median of 5 rounds x 10 calls, each system alone in its "
          "block, blocks rotated):")
    for name, ts in lat.items():
        t = statistics.median(ts)
        print(f"  {name:40s} {t * 1e3:6.2f} ms  {base / t:5.2f}x ort-opt")
    for engine in running.values():
        engine.close()
    if args.markdown:
        print("\n| truncation | system | seq/s | vs ort-opt arrival | vs ort-opt sorted | "
              "vs engine ort fp32 | min cosine to fp32 |")
        print("|---|---|---|---|---|---|---|")
        for r in rows_out:
            print(f"| {r['limit']} | {r['system']} | {r['seq_s']:.1f} | {r['vs_arrival']:.2f}x "
                  f"| {r['vs_sorted']:.2f}x | {r['vs_packed']:.2f}x | {r['cosine']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
