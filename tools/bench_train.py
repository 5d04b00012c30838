"""Benchmark: a bertrt pre-training step against `transformers` `BertForPreTraining`, on CPU.

One process, the same configuration (the MiniLM-L6 shape: vocab 30522, H=384, 6 layers, 12
heads, FFN 1536), the same initial weights (a seeded `Model.from_config(..., "pretraining")`,
saved and loaded by `BertForPreTraining.from_pretrained`), the same batches (bertrt's own
`collate_pretraining` masking — 15 %, 19 of the 126 non-special positions of a row — over random
wordpiece ids; HF gets the equivalent `labels`, -100 off the masked positions, and
`next_sentence_label`), fp32, dropout as configured (0.1) in both, the same thread count.

bertrt's step is what `bertrt/train/loop.py` runs per optimizer step (its `Task`, the
`losses` functions, `build_optimizer`/`build_scheduler`, clip 1.0): the torch lowering's
forward with `masked_positions`, so the MLM head (transform + tied 30522-way decoder) runs on
the M masked rows only, then the MLM + NSP losses normalised by the step's counts. HF's step is
its forward with `labels` (MLM head over all B x S positions), backward, clip 1.0, AdamW.
Both optimizers are `bertrt.train.optim.build_optimizer` (AdamW, lr 1e-4, weight decay 0.01,
none on biases and LayerNorm).

Correctness first: with dropout off (`eval()`), the first batch's losses must agree (< 1e-4),
and one optimizer step of each must leave every parameter within 1e-5 of the other's. Then
warm-up steps, then steps timed interleaved (A B A B ...) so load drift hits both alike.
Printed: median / min / max / IQR step time, tokens/s (B x S / step), the ratio, FLOPs per step
(3 x forward matrix-product FLOPs from `graph.flops`: bertrt's of the masked-MLM graph with
`masked=M`, HF's of the graph with the head on all positions) and the utilisation of the
machine's measured fp32 matmul rate.

    python tools/bench_train.py --threads 2 --repeats 10
    python tools/bench_train.py --shape-preset tiny          # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_torch import matmul_gflops, minilm_dir, spread, time_interleaved  # noqa: E402

from bertrt.config import BertConfig  # noqa: E402
from bertrt.graph import build_bert  # noqa: E402
from bertrt.model import Model  # noqa: E402
from bertrt.tokenizer import Tokenizer  # noqa: E402
from bertrt.train import losses  # noqa: E402
from bertrt.train.data import Example  # noqa: E402
from bertrt.train.optim import build_optimizer, build_scheduler, no_decay_names  # noqa: E402
from bertrt.train.setup import Dist  # noqa: E402
from bertrt.train.task import PretrainTask, Task  # noqa: E402

LOSS_TOL = 1e-4
PARAM_TOL = 1e-5
TARGET = 1.8
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0
#: (config overrides, batch, seq, repeats, warmup) of each --shape-preset.
PRESETS = {
    "minilm": (None, 16, 128, 10, 2),
    "tiny": ("tiny", 8, 64, 4, 1),
}


# ====================================================================== data
def random_examples(n: int, seq: int, tok: Tokenizer, seed: int) -> list[Example]:
    """`[CLS] A [SEP] B [SEP]` rows of exactly `seq` tokens, random ids in [1000, vocab) (plain
    wordpieces), token types 0/1, a random NSP label: no padding, as a packed corpus gives."""
    rng = np.random.default_rng(seed)
    len_a = (seq - 3) // 2
    len_b = seq - 3 - len_a
    out = []
    for _ in range(n):
        a = rng.integers(1000, tok.vocab_size, len_a).tolist()
        b = rng.integers(1000, tok.vocab_size, len_b).tolist()
        ids = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
        types = [0] * (len_a + 2) + [1] * (len_b + 1)
        out.append(Example(ids, types, label=int(rng.integers(2))))
    return out


def hf_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, S) MLM labels as transformers takes them: the original id at each masked position,
    -100 elsewhere."""
    labels = torch.full_like(batch["input_ids"], losses.IGNORE)
    labels.view(-1)[batch["masked_positions"]] = batch["mlm_labels"]
    return labels


# ====================================================================== the two steps
@dataclass
class BertrtTrainer:
    """The per-step body of `loop._train` at grad_accum 1, one process, fp32."""

    net: torch.nn.Module
    task: Task
    env: Dist
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    params: list[torch.nn.Parameter]

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        denominators = self.env.all_sum(self.task.counts(batch)).to(self.env.device)
        with self.autocast:
            outputs = self.net(**self.task.inputs(batch, self.env.device))
            return self.task.loss(outputs, batch, denominators)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss, micro_stats = self.forward_loss(batch)
        self.scaler.scale(loss).backward()
        stats = self.env.all_sum(micro_stats.cpu())
        metrics = self.task.summarize(stats)
        if not math.isfinite(metrics["loss"]):
            raise SystemExit(f"bertrt: the loss is {metrics['loss']}")
        self.scaler.unscale_(self.optimizer)
        float(torch.nn.utils.clip_grad_norm_(self.params, CLIP))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return metrics["loss"]


@dataclass
class HFTrainer:
    """The usual transformers step: forward with labels, backward, clip, AdamW."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"], labels=batch["hf_labels"],
                          next_sentence_label=batch["nsp_labels"])

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.forward(batch).loss
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise SystemExit(f"transformers: the loss is {value}")
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return value


def optimizer_and_schedule(module: torch.nn.Module, no_decay: frozenset[str]):
    opt = build_optimizer(module.named_parameters(), "adamw", LR, WEIGHT_DECAY, no_decay)
    # no warm-up: the checked first step runs at the full lr; never reaches zero here
    return opt, build_scheduler(opt, "linear", 0.0, 10**6)


# ====================================================================== correctness
def check_same_weights(net: torch.nn.Module, hf: torch.nn.Module) -> int:
    """Every bertrt parameter equals HF's of the same name, and the counts match."""
    ours = dict(net.named_parameters())
    theirs = dict(hf.named_parameters())  # tied decoder weight/bias listed once
    if set(ours) != set(theirs):
        raise SystemExit(f"parameter names differ: only bertrt {sorted(set(ours) - set(theirs))}"
                         f", only HF {sorted(set(theirs) - set(ours))}")
    for name, p in ours.items():
        if not torch.equal(p, theirs[name]):
            raise SystemExit(f"{name}: initial weights differ")
    return sum(p.numel() for p in ours.values())


def max_param_diff(net: torch.nn.Module, hf: torch.nn.Module) -> tuple[float, str]:
    theirs = dict(hf.named_parameters())
    return max(((p - theirs[n]).abs().max().item(), n) for n, p in net.named_parameters())


def check(ours: BertrtTrainer, hf: HFTrainer, batch: dict[str, torch.Tensor]) -> dict:
    """Dropout off: losses equal on `batch`, then one step of each leaves equal parameters."""
    ours.net.eval()
    hf.model.eval()
    loss_ours, _ = ours.forward_loss(batch)
    loss_hf = hf.forward(batch).loss
    loss_diff = abs(loss_ours.item() - loss_hf.item())
    if not loss_diff < LOSS_TOL:
        raise SystemExit(f"losses disagree: bertrt {loss_ours.item():.6f}, HF "
                         f"{loss_hf.item():.6f} (diff {loss_diff:.3g} >= {LOSS_TOL}) — not timing")
    ours.net.zero_grad(set_to_none=True)
    hf.model.zero_grad(set_to_none=True)
    ours.step(batch)
    hf.step(batch)
    param_diff, where = max_param_diff(ours.net, hf.model)
    if not param_diff < PARAM_TOL:
        raise SystemExit(f"after one step the parameters differ by {param_diff:.3g} (at {where})"
                         f" >= {PARAM_TOL} — not timing")
    ours.net.train()
    hf.model.train()
    return {"loss_bertrt": loss_ours.item(), "loss_hf": loss_hf.item(), "loss_diff": loss_diff,
            "param_diff": param_diff}


# ====================================================================== main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape-preset", choices=sorted(PRESETS), default="minilm",
                    help="minilm: the MiniLM-L6 shape at 16x128; tiny: a quick smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's")
    ap.add_argument("--seq", type=int, default=None, help="default: the preset's")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps of each")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps of each first")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    ap.add_argument("--profile", type=Path, default=None,
                    help="after timing, profile 2 bertrt steps (torch.profiler) and write the "
                         "op table to this file")
    args = ap.parse_args(argv)
    load_at_start = os.getloadavg()[0]  # other work on the machine, before ours adds to it
    preset, batch_size, seq, repeats, warmup = PRESETS[args.shape_preset]
    batch_size = args.batch or batch_size
    seq = args.seq or seq
    repeats = args.repeats or repeats
    warmup = args.warmup if args.warmup is not None else warmup

    import transformers

    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_dir(minilm_dir())
    cfg = BertConfig.from_pretrained(minilm_dir())
    if preset is not None:
        cfg = BertConfig.preset(preset, vocab_size=tok.vocab_size)

    # ------------------------------------------------------------------ same weights
    model = Model.from_config(cfg, head="pretraining", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        hf_model = transformers.BertForPreTraining.from_pretrained(tmp)
    attn = getattr(hf_model.config, "_attn_implementation", "?")
    net = model.to_torch()
    net.check_inputs = False  # as loop.py sets it
    n_params = check_same_weights(net, hf_model)

    # ------------------------------------------------------------------ same batches
    env = Dist(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    examples = random_examples(args.batches * batch_size, seq, tok, seed=0)

    task = PretrainTask(examples, None, tok, seed=0, batch_size=batch_size, grad_accum=1)
    batches = []
    for step in range(args.batches):
        b = task.batch(step, 0, env)
        b["hf_labels"] = hf_labels(b)
        batches.append(b)
    masked = statistics.mean(len(b["masked_positions"]) for b in batches)

    no_decay = no_decay_names(model.graph)  # the same groups for both (names are HF's)
    ours = BertrtTrainer(net, task, env, *optimizer_and_schedule(net, no_decay),
                         torch.amp.GradScaler("cpu", enabled=False),
                         torch.autocast("cpu", enabled=False),
                         [p for p in net.parameters() if p.requires_grad])
    theirs = HFTrainer(hf_model, *optimizer_and_schedule(hf_model, no_decay),
                       [p for p in hf_model.parameters() if p.requires_grad])

    # ------------------------------------------------------------------ correctness, timing
    checked = check(ours, theirs, batches[0])
    peak = matmul_gflops()
    order_ours, order_hf = itertools.cycle(batches), itertools.cycle(batches)

    def run_ours() -> None:
        ours.step(next(order_ours))

    def run_hf() -> None:
        theirs.step(next(order_hf))

    for _ in range(warmup):
        run_ours()
        run_hf()
    t_ours, t_hf = time_interleaved([run_ours, run_hf], repeats)
    peak = max(peak, matmul_gflops())  # best of before and after: load only lowers it

    # ------------------------------------------------------------------ report
    tokens = batch_size * seq
    # bertrt's step runs the masked-MLM form of the graph (the MLM head on M rows);
    # `model.graph` is the form with the head on every position, as transformers runs it.
    masked_form = build_bert(cfg, "pretraining", masked_lm=True)
    flops_ours = 3 * masked_form.flops(batch=batch_size, seq=seq, masked=round(masked))
    flops_hf = 3 * model.graph.flops(batch=batch_size, seq=seq)  # all B*S rows
    a, b = spread(t_ours), spread(t_hf)
    ratio = b["median"] / a["median"]
    paired = statistics.median(h / o for o, h in zip(t_ours, t_hf))

    print(f"shape: {args.shape_preset} ({cfg.num_hidden_layers} layers, H={cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, FFN {cfg.intermediate_size}, vocab "
          f"{cfg.vocab_size}, {n_params:,} parameters); batch {batch_size} x seq {seq}, "
          f"{masked:.0f} masked positions per batch ({masked / batch_size:.1f} per row)")
    print(f"torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attn_implementation={attn}), threads={args.threads}, "
          f"cpu={platform.processor() or platform.machine()}, cores={os.cpu_count()}, "
          f"load average {load_at_start:.2f} (1 min, at the start)")
    print(f"AdamW lr {LR}, weight decay {WEIGHT_DECAY} (not on biases/LayerNorm), clip "
          f"{CLIP}, fp32, dropout {cfg.hidden_dropout_prob}/{cfg.attention_probs_dropout_prob}; "
          f"repeats={repeats}, warmup={warmup}, {args.batches} batches cycled")
    print(f"check (dropout off): loss bertrt {checked['loss_bertrt']:.6f}, HF "
          f"{checked['loss_hf']:.6f}, diff {checked['loss_diff']:.1e} (< {LOSS_TOL}); after "
          f"one step max |param diff| {checked['param_diff']:.1e} (< {PARAM_TOL})")
    print()

    def ms(st: dict[str, float]) -> str:
        return (f"{st['median'] * 1e3:.0f} ({st['min'] * 1e3:.0f} / {st['max'] * 1e3:.0f} / "
                f"{st['iqr'] * 1e3:.0f})")

    header = ("| system | step median ms (min / max / IQR) | tokens/s | GFLOP/step executed "
              "| GFLOP/s | MFU (model FLOPs) | HFU (executed FLOPs) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, st, executed in (("bertrt (MLM on masked rows)", a, flops_ours),
                               ("transformers BertForPreTraining", b, flops_hf)):
        t = st["median"]
        print(f"| {name} | {ms(st)} | {tokens / t:,.0f} | {executed / 1e9:.1f} "
              f"| {executed / t / 1e9:.1f} | {flops_ours / t / 1e9 / peak:.1%} "
              f"| {executed / t / 1e9 / peak:.1%} |")
    print()
    print(f"ratio of tokens/s bertrt / transformers: {ratio:.3f} (of medians), {paired:.3f} "
          f"(median of paired steps); target >= {TARGET}")
    print(f"model FLOPs per step: 3 x forward = {flops_ours / 1e9:.1f} GFLOP (MLM head on "
          f"{masked:.0f} rows); transformers executes {flops_hf / 1e9:.1f} GFLOP (MLM head on "
          f"all {tokens} rows), {flops_hf / flops_ours:.2f}x; fp32 matmul peak "
          f"(2048^3 torch.matmul, best of 10 before and 10 after): {peak:.1f} GFLOP/s")
    verdict = "MET" if ratio >= TARGET else "MISSED"
    print(f"verdict: bertrt trains at {ratio:.2f}x the tokens/s of transformers "
          f"BertForPreTraining ({tokens / a['median']:,.0f} vs {tokens / b['median']:,.0f} "
          f"tokens/s, MFU {flops_ours / a['median'] / 1e9 / peak:.0%}): target {TARGET}x "
          f"{verdict}")

    if args.profile is not None:
        profile_steps(run_ours, args.profile)


def profile_steps(step: Callable[[], None], path: Path, steps: int = 2) -> None:
    """Where bertrt's step time goes: torch.profiler's op table over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    shapes = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=40)
    path.write_text(table + "\n\n" + shapes + "\n")
    print(f"profile of {steps} bertrt steps: {path}")


if __name__ == "__main__":
    main()
