"""The device check: one run on one GPU (H100/H200, <= 8 minutes) that says whether bertrt's CUDA
path is right and how fast it is, as one JSON file and one markdown table.

    PYTHONPATH=. python tools/gpu_check.py OUT_DIR            # on the GPU machine
    PYTHONPATH=. python tools/gpu_check.py OUT_DIR --dry-run  # anywhere: CPU, tiny, 2 steps

Sections, in order, each bounded in time (progress lines carry the seconds since the start):

a. kernels: `python -m pytest -x -q tests/kernels` in a subprocess (its CUDA tests compare every
   kernel with its float64 reference, forward and backward, on fp32/bf16/fp16 and edge shapes).
   A failure stops the check (timing wrong kernels means nothing; `--keep-going` goes on); the
   output's tail is recorded. Then the device tests of the lowering and the loop
   (`tests/lower/test_device.py`, `tests/train/test_cuda_training.py`), recorded, not stopping.
b. loss curves: BERT-base, seq 128, bf16 autocast, 30 steps of the training step below with the
   kernels and with the references (`bertrt.kernels.cuda.use_kernels(False)`), the same seed,
   weights and batches, dropout off: dropout draws its masks from different RNG streams in a
   kernel and in torch, so with it on the curves differ by the masks, not by the arithmetic.
   Passed when at every step |loss_kernels - loss_reference| <= 2e-2 * loss_reference.
c. pre-training throughput: tokens/s and MFU of bertrt with kernels, bertrt with references and
   `transformers` `BertForPreTraining(attn_implementation="sdpa")`, bf16 autocast, dropout 0.1,
   interleaved in rounds (warm-up steps first; each round times a few steps of each between
   `torch.cuda.synchronize()`s). MFU = model FLOPs per step / step time / peak, where model
   FLOPs are 3 x the forward matrix-product FLOPs of the graph bertrt trains (the masked-MLM
   form: the MLM head on the masked rows; `Graph.flops`) — the same useful work for all three
   (transformers also runs the MLM head on every other position: its executed FLOPs are
   reported beside) — and the peak is a timed large bf16 `torch.matmul`.
d. inference: b1 x 128 and b32 x 128, `torch.inference_mode`, bf16 autocast: the torch lowering
   padded and packed (`to_torch(packed=True)`, varlen attention where torch has it) against
   `transformers` `BertModel` (sdpa); medians of synchronized calls, outputs compared first.
e. `OUT_DIR/gpu_check.json` (everything) and `OUT_DIR/gpu_check.md` (the table for
   BENCHMARKS.md, with the GPU's name and the versions).

The training step is the body of `bertrt.train.loop._step` at grad_accum 1 on one process (the
task's loss functions, `build_optimizer`'s AdamW, clip 1.0) over pre-collated random batches
already on the device, so it times the device work. `--dry-run` runs the same code on the CPU
with a tiny config, 2 steps and the references, so a machine without CUDA checks everything but
the numbers. ONNX Runtime's CUDA backend (`ort-cuda`) is not checked: the GPU machine's
onnxruntime is the CPU build.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bertrt.config import BertConfig  # noqa: E402
from bertrt.graph import build_bert  # noqa: E402
from bertrt.kernels import cuda as kernel_switch  # noqa: E402
from bertrt.model import Model  # noqa: E402
from bertrt.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402
from bertrt.train.data import Example  # noqa: E402
from bertrt.train.optim import build_optimizer, no_decay_names  # noqa: E402
from bertrt.train.setup import Dist  # noqa: E402
from bertrt.train.task import PretrainTask, to_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The loss-curve bound: relative, at every step.
CURVE_RTOL = 2e-2
#: Inference outputs of bertrt and transformers in bf16 (LayerNorm outputs are O(1)).
INFERENCE_ATOL = 0.1
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0


@dataclass(frozen=True)
class Plan:
    """The sizes of a check: the real one, or the dry run's."""

    config: BertConfig
    device: torch.device
    batch: int
    seq: int
    curve_steps: int
    warmup: int
    rounds: int
    steps_per_round: int
    inference_shapes: tuple[tuple[int, int], ...]
    inference_repeats: int
    peak_n: int
    kernel_timeout_s: int
    dtype: torch.dtype  # autocast's (float32: no autocast)


def plan(dry_run: bool) -> Plan:
    if dry_run:
        config = BertConfig.preset("tiny", vocab_size=512)
        return Plan(config, torch.device("cpu"), batch=2, seq=16, curve_steps=2, warmup=1,
                    rounds=2, steps_per_round=1, inference_shapes=((1, 16), (2, 16)),
                    inference_repeats=2, peak_n=256, kernel_timeout_s=0,
                    dtype=torch.float32)
    config = BertConfig.preset("base")
    return Plan(config, torch.device("cuda"), batch=64, seq=128, curve_steps=30, warmup=3,
                rounds=4, steps_per_round=5, inference_shapes=((1, 128), (32, 128)),
                inference_repeats=30, peak_n=8192, kernel_timeout_s=200, dtype=torch.bfloat16)


# ====================================================================== progress, sections
class Log:
    """Progress lines with the seconds since the start, and the sections' records."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.sections: dict[str, dict[str, Any]] = {}

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", flush=True)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        """A section's record: its seconds and status ("ok", or "error" with the message:
        one section's failure does not stop the others)."""
        record: dict[str, Any] = {"status": "ok"}
        self.sections[name] = record
        self(f"{name}: start")
        start = time.perf_counter()
        try:
            yield record
        except Exception as exc:  # recorded and reported; the next section runs
            record.update(status="error", error=f"{type(exc).__name__}: {exc}")
            self(f"{name}: ERROR {record['error']}")
        finally:
            record["seconds"] = round(time.perf_counter() - start, 2)
            self(f"{name}: {record['status']} in {record['seconds']}s")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ====================================================================== a. kernels
def run_pytest(paths: list[str], timeout_s: int) -> dict[str, Any]:
    """`pytest -x -q paths` in a subprocess: passed or not, and the output's tail."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *paths]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get(
                                                                         "PYTHONPATH")]))}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (
            exc.stdout or "")
        output, code = output + f"\n(timed out after {timeout_s}s)", -1
    lines = output.strip().splitlines()
    return {"passed": code == 0, "returncode": code, "summary": lines[-1] if lines else "",
            "tail": "\n".join(lines[-40:])}


# ====================================================================== data and models
def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    return Tokenizer([*SPECIAL_TOKENS, *(f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS)))])


def batches(tok: Tokenizer, p: Plan, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`n` pre-training batches of full rows (`[CLS] A [SEP] B [SEP]`, random word ids, a
    random NSP label), masked by bertrt's own collate, on the device; each carries its loss
    denominators and transformers' (B, S) MLM labels."""
    rng = np.random.default_rng(seed)
    len_a = (p.seq - 3) // 2
    len_b = p.seq - 3 - len_a
    first_word = len(SPECIAL_TOKENS)
    examples = []
    for _ in range(n * p.batch):
        a = rng.integers(first_word, tok.vocab_size, len_a).tolist()
        b = rng.integers(first_word, tok.vocab_size, len_b).tolist()
        examples.append(Example([tok.cls_id, *a, tok.sep_id, *b, tok.sep_id],
                                [0] * (len_a + 2) + [1] * (len_b + 1),
                                label=int(rng.integers(2))))
    task = PretrainTask(examples, None, tok, seed=seed, batch_size=p.batch, grad_accum=1)
    env = Dist(rank=0, world=1, local_rank=0, local_world=1, device=p.device)
    out = []
    for step in range(n):
        batch = task.batch(step, 0, env)
        batch["denominators"] = task.counts(batch)
        labels = torch.full_like(batch["input_ids"], -100)
        labels.view(-1)[batch["masked_positions"]] = batch["mlm_labels"]
        batch["hf_labels"] = labels
        out.append(to_device(batch, p.device))
    return out


def bertrt_model(p: Plan, tok: Tokenizer, dropout: float, head: str = "pretraining") -> Model:
    config = dataclasses.replace(p.config, hidden_dropout_prob=dropout,
                                 attention_probs_dropout_prob=dropout)
    return Model.from_config(config, head=head, seed=0, tokenizer=tok).to(p.device)


class BertrtStep:
    """`loop._step`'s body at grad_accum 1 on one process: forward under autocast (no mask:
    the rows are full), the task's loss, backward, clip, AdamW, zero_grad."""

    def __init__(self, model: Model, p: Plan, tok: Tokenizer) -> None:
        self.net = model.to_torch()
        self.net.check_inputs = False
        self.net.train()
        self.params = list(self.net.parameters())
        self.optimizer = build_optimizer(self.net.named_parameters(), "adamw", LR,
                                         WEIGHT_DECAY, no_decay_names(model.graph))
        self.task = PretrainTask([], None, tok, seed=0, batch_size=p.batch, grad_accum=1)
        self.autocast = autocast(p)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast:
            outputs = self.net(input_ids=batch["input_ids"],
                               token_type_ids=batch["token_type_ids"],
                               masked_positions=batch["masked_positions"])
            loss, _ = self.task.loss(outputs, batch, batch["denominators"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class HFStep:
    """The usual transformers step: forward with labels under autocast, backward, clip,
    torch's AdamW (fused on CUDA, as a user would pick it)."""

    def __init__(self, model_dir: Path, p: Plan) -> None:
        import transformers

        self.model = transformers.BertForPreTraining.from_pretrained(
            model_dir, attn_implementation="sdpa").to(p.device)
        self.model.train()
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY,
                                           fused=p.device.type == "cuda")
        self.autocast = autocast(p)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast:
            loss = self.model(input_ids=batch["input_ids"],
                              token_type_ids=batch["token_type_ids"],
                              labels=batch["hf_labels"],
                              next_sentence_label=batch["nsp_labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def autocast(p: Plan) -> torch.autocast:
    return torch.autocast(p.device.type, dtype=p.dtype, enabled=p.dtype != torch.float32)


def kernels(enabled: bool) -> contextlib.AbstractContextManager:
    return kernel_switch.use_kernels(enabled)


# ====================================================================== b. loss curves
def loss_curves(p: Plan, tok: Tokenizer, data: list[dict[str, torch.Tensor]],
                with_kernels: bool, log: Log) -> dict[str, Any]:
    curves: dict[str, list[float]] = {}
    systems = (("kernels", True), ("reference", False)) if with_kernels else (
        ("reference", False),)
    for name, enabled in systems:
        step = BertrtStep(bertrt_model(p, tok, dropout=0.0), p, tok)
        with kernels(enabled):
            curves[name] = [float(step(data[i % len(data)])) for i in range(p.curve_steps)]
        log(f"loss curve {name}: {curves[name][0]:.4f} -> {curves[name][-1]:.4f}")
        del step
    out: dict[str, Any] = {"steps": p.curve_steps, "rtol": CURVE_RTOL, **curves}
    if "kernels" in curves:
        diffs = [abs(a - b) for a, b in zip(curves["kernels"], curves["reference"])]
        rel = [d / abs(b) for d, b in zip(diffs, curves["reference"])]
        out.update(max_abs_diff=max(diffs), max_rel_diff=max(rel),
                   passed=all(r <= CURVE_RTOL for r in rel))
    return out


# ====================================================================== c. throughput
def matmul_peak_flops(p: Plan) -> float:
    """Best-of FLOP/s of an n x n x n matrix product in the autocast dtype on the device: the
    practical peak MFU is measured against."""
    dtype = p.dtype
    a = torch.randn(p.peak_n, p.peak_n, device=p.device, dtype=dtype)
    b = torch.randn(p.peak_n, p.peak_n, device=p.device, dtype=dtype)
    best = math.inf
    for i in range(12):
        synchronize(p.device)
        t0 = time.perf_counter()
        for _ in range(5):
            torch.matmul(a, b)
        synchronize(p.device)
        if i >= 2:  # the first calls pick and warm the kernel
            best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * p.peak_n**3 / best


def time_interleaved(steps: dict[str, Callable[[], object]], p: Plan, log: Log,
                     budget_s: float) -> dict[str, list[float]]:
    """Seconds per step of each, from rounds that alternate them (each round times
    `steps_per_round` steps of each between synchronizations); warm-up steps first. Rounds stop
    early when the budget is spent (at least one round is timed)."""
    for name, fn in steps.items():
        for _ in range(p.warmup):
            fn()
        synchronize(p.device)
        log(f"warmed up {name}")
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    for r in range(p.rounds):
        for name, fn in steps.items():
            synchronize(p.device)
            t0 = time.perf_counter()
            for _ in range(p.steps_per_round):
                fn()
            synchronize(p.device)
            times[name].append((time.perf_counter() - t0) / p.steps_per_round)
        log(f"round {r + 1}/{p.rounds}: " + ", ".join(
            f"{name} {ts[-1] * 1e3:.1f} ms" for name, ts in times.items()))
        if time.perf_counter() - start > budget_s:
            log(f"time budget of {budget_s:.0f}s spent: stopping after round {r + 1}")
            break
    return times


def throughput(p: Plan, tok: Tokenizer, data: list[dict[str, torch.Tensor]],
               with_kernels: bool, with_hf: bool, log: Log, budget_s: float) -> dict[str, Any]:
    model = bertrt_model(p, tok, dropout=0.1)
    ours = BertrtStep(model, p, tok)
    cycle = {"i": 0}

    def next_batch() -> dict[str, torch.Tensor]:
        cycle["i"] += 1
        return data[cycle["i"] % len(data)]

    def with_switch(enabled: bool) -> Callable[[], object]:
        def run() -> object:
            with kernels(enabled):
                return ours(next_batch())
        return run

    steps: dict[str, Callable[[], object]] = {}
    if with_kernels:
        steps["bertrt (kernels)"] = with_switch(True)
    steps["bertrt (references)"] = with_switch(False)
    hf_executed = None
    if with_hf:
        with tempfile.TemporaryDirectory() as tmp:
            model.save(tmp)
            theirs = HFStep(Path(tmp), p)
        steps["transformers (sdpa)"] = lambda: theirs(next_batch())
        hf_executed = 3 * model.graph.flops(batch=p.batch, seq=p.seq)  # MLM head everywhere
    peak = matmul_peak_flops(p)
    log(f"matmul peak: {peak / 1e12:.1f} TFLOP/s")
    times = time_interleaved(steps, p, log, budget_s)
    masked = round(statistics.mean(len(b["masked_positions"]) for b in data))
    model_flops = 3 * build_bert(model.config, "pretraining", masked_lm=True).flops(
        batch=p.batch, seq=p.seq, masked=masked)
    systems = {}
    for name, ts in times.items():
        seconds = statistics.median(ts)
        systems[name] = {
            "step_ms": seconds * 1e3, "step_ms_min": min(ts) * 1e3, "rounds": len(ts),
            "tokens_per_s": p.batch * p.seq / seconds,
            "achieved_flops": model_flops / seconds,
            "mfu": model_flops / seconds / peak,
        }
    if hf_executed is not None:
        name = "transformers (sdpa)"
        systems[name]["executed_flops_per_step"] = hf_executed
        systems[name]["hfu"] = hf_executed / (systems[name]["step_ms"] / 1e3) / peak
    out: dict[str, Any] = {"batch": p.batch, "seq": p.seq, "masked_per_batch": masked,
                           "model_flops_per_step": model_flops, "peak_flops": peak,
                           "peak_dtype": str(p.dtype),
                           "systems": systems}
    if "transformers (sdpa)" in systems:
        hf = systems["transformers (sdpa)"]["tokens_per_s"]
        out["speedup_vs_transformers"] = {k: v["tokens_per_s"] / hf for k, v in systems.items()
                                          if k != "transformers (sdpa)"}
    return out


# ====================================================================== d. inference
def inference(p: Plan, tok: Tokenizer, with_hf: bool, log: Log) -> dict[str, Any]:
    model = bertrt_model(p, tok, dropout=0.1, head="none")
    padded, packed = model.to_torch(), model.to_torch(packed=True)
    for net in (padded, packed):
        net.check_inputs = False
    hf = None
    if with_hf:
        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            model.save(tmp)
            hf = transformers.BertModel.from_pretrained(
                tmp, attn_implementation="sdpa", add_pooling_layer=True).to(p.device).eval()
    gen = torch.Generator().manual_seed(0)
    shapes: dict[str, Any] = {}
    for b, s in p.inference_shapes:
        ids = torch.randint(len(SPECIAL_TOKENS), tok.vocab_size, (b, s), generator=gen)
        calls = _inference_calls(padded, packed, hf, ids.to(p.device))
        row: dict[str, Any] = {}
        with torch.inference_mode(), autocast(p):
            outs = {name: fn().float() for name, fn in calls.items()}
            base = outs["bertrt padded"]
            row["max_abs_diff"] = {name: float((o - base).abs().max()) for name, o in outs.items()
                                   if name != "bertrt padded"}
            row["outputs_agree"] = all(d <= INFERENCE_ATOL for d in row["max_abs_diff"].values())
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(2):
                for fn in calls.values():
                    fn()
            for _ in range(p.inference_repeats):
                for name, fn in calls.items():
                    synchronize(p.device)
                    t0 = time.perf_counter()
                    fn()
                    synchronize(p.device)
                    times[name].append(time.perf_counter() - t0)
        row["ms"] = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        shapes[f"{b}x{s}"] = row
        log(f"inference {b}x{s}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["ms"].items()))
    return {"dtype": str(p.dtype), "shapes": shapes}


def _inference_calls(padded: torch.nn.Module, packed: torch.nn.Module, hf: Any,
                     ids: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The forwards timed on one (B, S) batch of full rows, each returning (B, S, H)."""
    b, s = ids.shape
    flat = ids.reshape(-1)
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32)  # offsets on the host, as served
    calls = {"bertrt padded": lambda: padded(ids)["last_hidden_state"],
             "bertrt packed": lambda: packed(flat, cu)["last_hidden_state"].view(b, s, -1)}
    if hf is not None:
        calls["transformers (sdpa)"] = lambda: hf(input_ids=ids).last_hidden_state
    return calls


# ====================================================================== e. the files
def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "cuda": torch.version.cuda}
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy", "transformers", "onnxruntime",
                 "onnxruntime-gpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    v = meta["versions"]
    cupy = next((f"{k} {v[k]}" for k in ("cupy-cuda13x", "cupy-cuda12x", "cupy") if k in v),
                "no CuPy")
    lines = [f"### GPU check: {meta['device_name']}{' (dry run)' if meta['dry_run'] else ''}",
             "",
             f"torch {v['torch']} (CUDA {v['cuda']}), {cupy}, transformers "
             f"{v.get('transformers', '-')}; {meta['date']}; {meta['seconds']:.0f} s", ""]
    kt = report.get("kernel_tests", {})
    lines.append(f"- kernels vs float64 references: {kt.get('result', 'not run')}")
    curves = report.get("loss_curves", {})
    if "max_rel_diff" in curves:
        lines.append(f"- loss curves, kernels vs references ({curves['steps']} steps, dropout "
                     f"off): max abs diff {curves['max_abs_diff']:.2e}, max rel diff "
                     f"{curves['max_rel_diff']:.2e} (bound {curves['rtol']}): "
                     f"{'pass' if curves['passed'] else 'FAIL'}")
    pre = report.get("pretraining")
    if pre:
        lines += ["", f"Pre-training, batch {pre['batch']} x seq {pre['seq']}, bf16 autocast "
                  f"({pre['masked_per_batch']} masked positions per batch); peak "
                  f"{pre['peak_flops'] / 1e12:.3g} TFLOP/s ({pre['peak_dtype']} matmul):", "",
                  "| system | step ms | tokens/s | MFU | vs transformers |",
                  "|---|---|---|---|---|"]
        speedup = pre.get("speedup_vs_transformers", {})
        for name, s in pre["systems"].items():
            ratio = speedup.get(name)
            lines.append(f"| {name} | {s['step_ms']:.1f} | {s['tokens_per_s']:,.0f} | "
                         f"{s['mfu']:.1%} | {f'{ratio:.2f}x' if ratio else '-'} |")
    inf = report.get("inference")
    if inf:
        names = list(next(iter(inf["shapes"].values()))["ms"])
        lines += ["", f"Inference ({inf['dtype']} autocast, `torch.inference_mode`), median ms:",
                  "", "| shape | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for shape, row in inf["shapes"].items():
            lines.append(f"| {shape} | " + " | ".join(f"{row['ms'][n]:.2f}" for n in names)
                         + " |")
    failures = report.get("failures", [])
    if failures:
        lines += ["", "Failures: " + "; ".join(failures)]
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


# ====================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the folder gpu_check.json and gpu_check.md go to")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, a tiny config, 2 steps, the references: the code paths only")
    ap.add_argument("--keep-going", action="store_true",
                    help="go on after a kernel test fails")
    ap.add_argument("--no-transformers", action="store_true",
                    help="leave transformers out (it is left out anyway when not installed)")
    args = ap.parse_args(argv)
    log = Log()
    p = plan(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the code paths on CPU")
    with_kernels = not args.dry_run
    with_hf = not args.no_transformers and importlib.util.find_spec("transformers") is not None
    if p.device.type == "cuda":  # as `bertrt train` sets it on CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report: dict[str, Any] = {"meta": {
        "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M"),
        "device_name": (torch.cuda.get_device_name() if p.device.type == "cuda"
                        else f"CPU ({platform.machine()})"),
        "versions": versions(), "config": {k: getattr(p.config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size")}}, "failures": []}
    failures: list[str] = report["failures"]
    log(f"{report['meta']['device_name']}; torch {torch.__version__}; "
        f"{'dry run' if args.dry_run else 'full check'}")

    def finish() -> int:
        report["meta"]["seconds"] = time.perf_counter() - log.t0
        report["sections"] = log.sections
        write(args.out, report)
        log(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
        return 1 if failures else 0

    # a. kernels, then the device tests of the lowering and the loop
    with log.section("kernels") as record:
        if args.dry_run:
            report["kernel_tests"] = {"result": "skipped (dry run)"}
        else:
            kt = run_pytest(["tests/kernels"], p.kernel_timeout_s)
            device_tests = run_pytest(["tests/lower/test_device.py",
                                       "tests/train/test_cuda_training.py"], 90)
            kt["result"] = ("pass" if kt["passed"] else "FAIL") + f" ({kt['summary']})"
            report["kernel_tests"] = kt
            report["device_tests"] = device_tests
            log(f"kernel tests: {kt['summary']}; device tests: {device_tests['summary']}")
            if not device_tests["passed"]:
                failures.append("device tests: " + device_tests["summary"])
            if not kt["passed"]:
                failures.append("kernel tests: " + kt["summary"])
                record["status"] = "failed"
                if not args.keep_going:
                    log("a kernel test failed: stopping (--keep-going goes on)")
                    print(kt["tail"])
                    return finish()
    tok = synthetic_tokenizer(p.config.vocab_size)
    data = batches(tok, p, n=4, seed=0)

    # b. loss curves, kernels vs references
    with log.section("loss_curves"):
        curves = loss_curves(p, tok, data, with_kernels, log)
        report["loss_curves"] = curves
        if curves.get("passed") is False:
            failures.append(f"loss curves differ by {curves['max_rel_diff']:.2e} relative")
    synchronize(p.device)

    # c. pre-training throughput and MFU
    with log.section("pretraining"):
        report["pretraining"] = throughput(p, tok, data, with_kernels, with_hf, log,
                                           budget_s=120)
    if p.device.type == "cuda":
        torch.cuda.empty_cache()

    # d. inference
    with log.section("inference"):
        report["inference"] = inference(p, tok, with_hf, log)
        bad = [s for s, row in report["inference"]["shapes"].items() if not row["outputs_agree"]]
        if bad:
            failures.append(f"inference outputs disagree at {', '.join(bad)}")
    failures += [f"{name}: {r['error']}" for name, r in log.sections.items()
                 if r["status"] == "error"]
    return finish()


if __name__ == "__main__":
    sys.exit(main())
