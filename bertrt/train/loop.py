"""The training loop of `bertrt train`: pre-training (MLM + NSP) and fine-tuning.

It reads top to bottom as nanoGPT's `train.py` does: distributed setup from torchrun's
environment, the output folder, the tokenizer, the data, the model, the optimizer, then the
loop — gradient sync only on the last micro-step, logging and checkpoints on rank 0 — and at
the end the final model written as `OUT` itself.

What makes N processes equal to one, and a resumed run equal to an uninterrupted one:

* which examples form a step, and how they are masked, depend on `--seed` and the global
  example index only (`data.batch_indices`, `data.collate_pretraining`), not on the ranks;
* every loss is normalised by the count of its items over the whole step, all-reduced before
  the forward (`losses`), so micro-batch and rank boundaries do not weigh items differently;
* the only per-rank randomness is dropout, seeded `seed + rank`, and its RNG state is saved for
  every rank in each checkpoint with the optimizer, scheduler and GradScaler states.

Test hook (test-only, never for users): with the environment variable
`BERTRT_TEST_KILL_AT_STEP=N` the process kills itself with SIGKILL right after optimizer step N,
before that step is logged or checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import bertrt
from bertrt.config import BertConfig
from bertrt.errors import BertrtError
from bertrt.fileio import atomic_write_text
from bertrt.model import Model
from bertrt.tokenizer import Tokenizer, train_vocab
from bertrt.train import checkpoint as ckpt
from bertrt.train import losses
from bertrt.train.config import BEST_METRIC, TrainConfig, check_same_run, config_hash
from bertrt.train.optim import build_optimizer, build_scheduler
from bertrt.weights import HEAD_PREFIXES

KILL_HOOK = "BERTRT_TEST_KILL_AT_STEP"
METRICS = "metrics.jsonl"
RUN = "run.json"
LOSS_PNG = "loss.png"
DATA_DIR = "data"
#: The files `model.save(OUT)` writes into OUT (removed by --overwrite with the rest).
_MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json")
_RUN_OUTPUTS = (METRICS, RUN, LOSS_PNG, DATA_DIR, ckpt.CHECKPOINTS, ckpt.BEST, *_MODEL_FILES)


class TrainingError(BertrtError):
    """Training cannot go on (a non-finite loss, say); nothing saved before is lost."""


@dataclass(frozen=True)
class Dist:
    """Where this process sits: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, and its device."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place; returned for chaining)."""
        if self.enabled:
            moved = tensor.to(self.device)
            dist.all_reduce(moved)
            tensor.copy_(moved.to(tensor.device))
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.enabled:
            return [obj]
        objs: list[Any] = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs


def is_distributed_launch() -> bool:
    """True inside a process started by torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed() -> Dist:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); one process: none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, local_world, device)


def train(cfg: TrainConfig) -> Path:
    """Run `cfg` to `max_steps` (or resume it) and return `OUT`, the final model dir."""
    env = setup_distributed()
    try:
        return _train(cfg, env)
    finally:
        if env.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: Dist) -> Path:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    say = _Say(env.master)

    # ------------------------------------------------------------------ the output folder
    # Every rank checks the settings before rank 0 writes anything.
    resume_from = _check_out(cfg, out)
    state: dict[str, Any] | None = None
    start_step = 0
    if resume_from is not None:
        start_step, resume_dir = resume_from
        state = ckpt.load_state(resume_dir)
        check_same_run(state["trajectory"], cfg.trajectory(env.world), str(resume_dir))
    base = None if cfg.model is None or resume_from is not None else bertrt.load(cfg.model)
    _check_seq_len(cfg, base, resume_from)
    for path in (*cfg.data, *cfg.eval_data):
        if not Path(path).is_file():
            raise BertrtError(f"{path}: file not found")
    env.barrier()
    if env.master:
        if cfg.overwrite:
            _clear_outputs(out)
        ckpt.remove_partial(out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume and resume_from is None:
            say(f"notice: {out} has no complete checkpoint; starting from step 0")
    env.barrier()

    # ------------------------------------------------------------------ threads and seeds
    threads = _threads(cfg, env, state, say)
    torch.set_num_threads(threads)
    # Dropout is the only per-rank randomness; data order and masking are global (seeded
    # by --seed and the example index), so they do not depend on the rank.
    _seed_everything(cfg.seed + env.rank)

    # ------------------------------------------------------------------ tokenizer, data, model
    data_paths = _data_paths(cfg, out, env, say)
    tokenizer = _tokenizer(cfg, out, env, base, resume_from, data_paths, say)
    task = _build_task(cfg, tokenizer, data_paths, resume_from, say)
    model = _model(cfg, tokenizer, task.labels, base, resume_from, say)
    net = _lower(model, cfg.checkpoint_activations).to(env.device)
    net.check_inputs = False  # ids come from our own collate; skip a reduction per call
    net.train()
    module: torch.nn.Module = net
    if env.enabled:
        ids = [env.local_rank] if env.device.type == "cuda" else None
        module = DDP(net, device_ids=ids)

    # ------------------------------------------------------------------ optimizer and schedule
    optimizer = build_optimizer(net.named_parameters(), cfg.optimizer, cfg.lr,  # type: ignore
                                cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.warmup, cfg.max_steps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    autocast = torch.autocast(env.device.type, dtype=_AUTOCAST.get(cfg.precision),
                              enabled=cfg.precision != "fp32")
    best: float | None = None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"][env.rank])
        best = state.get("best")

    # ------------------------------------------------------------------ run record, metrics
    metrics_path = out / METRICS
    if env.master:
        _truncate_metrics(metrics_path, start_step)
        run = {"settings": cfg.to_dict(), "world_size": env.world, "threads": threads,
               "device": str(env.device), "resumed_from_step": start_step or None,
               "config_hash": config_hash(cfg.trajectory(env.world)),
               "model": {"head": model.head, "parameters": model.num_parameters(),
                         "config": model.config.to_dict()},
               "data": [str(p) for p in data_paths], "train_examples": len(task.source),
               "eval_examples": None if task.eval_source is None else len(task.eval_source),
               "versions": {"bertrt": bertrt.__version__, "torch": torch.__version__}}
        atomic_write_text(out / RUN, json.dumps(run, indent=2) + "\n")
        say(f"training {model!r} on {len(task.source):,} examples/epoch; {env.world} "
            f"process(es) x batch {cfg.batch_size} x accum {cfg.grad_accum} x seq "
            f"{cfg.seq_len}; {threads} thread(s); out: {out}")
    metrics_file = open(metrics_path, "a", encoding="utf-8") if env.master else None  # noqa: SIM115
    kill_at = int(os.environ.get(KILL_HOOK, "0") or 0)
    last: dict[str, Any] = _last_metrics(metrics_path) if env.master else {}
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not env.master,
               dynamic_ncols=True, unit="step", file=sys.stderr)
    say.bar = bar
    params = [p for p in net.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ the loop
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            # The step's micro-batches first: the loss denominators count all of them.
            batches = [task.batch(step, micro, env) for micro in range(cfg.grad_accum)]
            counts = sum(task.counts(b) for b in batches).to(env.device)
            denominators = env.all_sum(counts) / env.world  # DDP averages over ranks
            # summed on the device: one host sync per step (below), not one per micro-step
            stats = torch.zeros(len(task.stat_names) + 1, dtype=torch.float64, device=env.device)
            for micro, batch in enumerate(batches):
                last_micro = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last_micro or not env.enabled else (
                    module.no_sync())  # type: ignore[operator]
                with sync:
                    with autocast:
                        outputs = module(**task.inputs(batch, env.device))
                        loss, micro_stats = task.loss(outputs, batch, denominators)
                    scaler.scale(loss).backward()
                stats[:-1] += micro_stats
                stats[-1] += batch["input_ids"].numel()  # token positions, padding included
            stats = env.all_sum(stats).cpu()
            step_metrics = task.summarize(stats[:-1])  # the step's, over all ranks
            if not math.isfinite(step_metrics["loss"]):
                raise _non_finite(f"the loss is {step_metrics['loss']}", step + 1, out)
            scaler.unscale_(optimizer)
            max_norm = cfg.clip if cfg.clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(grad_norm) and not scaler.is_enabled():
                raise _non_finite(f"the gradient norm is {grad_norm}", step + 1, out)
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)  # with fp16 a step with inf gradients is skipped
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done = step + 1
            if done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # the test hook (see the module doc)
            dt = time.perf_counter() - t0

            row = {"step": done, "loss": step_metrics["loss"], "lr": lr,
                   "tokens_per_s": float(stats[-1]) / dt, **step_metrics,
                   "grad_norm": grad_norm}
            final = done == cfg.max_steps
            if task.eval_source is not None and (done % cfg.eval_every == 0 or final):
                scores = _evaluate(net, task, cfg, env, autocast)
                row.update({f"eval_{k}": v for k, v in scores.items()})
                metric = BEST_METRIC.get(cfg.task)
                if metric is not None and (best is None or scores[metric] > best):
                    best = scores[metric]
                    if env.master:
                        ckpt.save_model_dir(model, out / ckpt.BEST,
                                            {"eval.json": {"step": done, **scores}})
            if env.master:
                bar.update(1)
                bar.set_postfix_str(task.postfix(row), refresh=False)
                if done == 1 or done % cfg.log_every == 0 or final or "eval_loss" in row:
                    row["elapsed_s"] = time.perf_counter() - t_start
                    metrics_file.write(json.dumps(_rounded(row)) + "\n")  # type: ignore
                    metrics_file.flush()  # type: ignore[union-attr]
                last = row
            if done % cfg.save_every == 0 or final:
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    raise _non_finite("the parameters are no longer finite", done, out)
                rng = env.gather(ckpt.rng_state())  # every rank's dropout RNG
                if env.master:
                    ckpt.save_checkpoint(out, done, model, {
                        "step": done,
                        "trajectory": cfg.trajectory(env.world),
                        "config_hash": config_hash(cfg.trajectory(env.world)),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": rng,
                        # Examples are a pure function of (seed, index): the position is all
                        # the data state there is.
                        "data": {"next_step": done,
                                 "examples_seen": done * cfg.batch_size * cfg.grad_accum
                                 * env.world},
                        "threads": threads,
                        "world_size": env.world,
                        "best": best,
                        "bertrt_version": bertrt.__version__,
                    }, keep=cfg.keep)
                env.barrier()
    finally:
        bar.close()
        say.bar = None
        if metrics_file is not None:
            metrics_file.close()

    # ------------------------------------------------------------------ the final model
    if env.master:
        model.save(out)
        png = _plot(out)
        _report(cfg, out, model, last, best, png, time.perf_counter() - t_start, say)
    env.barrier()
    return out


# ====================================================================== the tasks
@dataclass
class Task:
    """How the loop feeds one task: its data, batches, forward inputs, loss and metrics."""

    name: str
    source: Any  # data.ExampleSource
    eval_source: Any | None
    collate: Callable[[list, list[int]], dict[str, torch.Tensor]]
    counts: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    loss: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    stat_names: tuple[str, ...]
    labels: list[str] | None
    batch_size: int
    grad_accum: int

    def batch(self, step: int, micro: int, env: Dist) -> dict[str, torch.Tensor]:
        """This rank's micro-batch `micro` of optimizer step `step` (0-based)."""
        from bertrt.train.data import batch_indices

        indices = batch_indices(step, micro, self.batch_size, self.grad_accum, env.rank,
                                env.world)
        return self.collate([self.source[i] for i in indices], indices)

    def inputs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        keys = ("input_ids", "attention_mask", "token_type_ids", "masked_positions")
        return {k: batch[k].to(device) for k in keys if k in batch}

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        """The step's (or eval's) metrics from summed `stats`."""
        s = dict(zip(self.stat_names, stats.tolist()))
        if self.name == "pretrain":
            mlm_loss = s["mlm_loss_sum"] / max(s["mlm_count"], 1)
            nsp_loss = s["nsp_loss_sum"] / max(s["nsp_count"], 1)
            return {"loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss,
                    "mlm_acc": s["mlm_correct"] / max(s["mlm_count"], 1),
                    "nsp_loss": nsp_loss, "nsp_acc": s["nsp_correct"] / max(s["nsp_count"], 1)}
        return {"loss": s["loss_sum"] / max(s["count"], 1),
                "accuracy": s["correct"] / max(s["count"], 1)}

    def postfix(self, row: dict[str, Any]) -> str:
        shown = [f"loss {row['loss']:.3f}"]
        if self.name == "pretrain":
            shown += [f"mlm {row['mlm_acc']:.1%}", f"nsp {row['nsp_acc']:.1%}"]
        else:
            shown.append(f"acc {row['accuracy']:.1%}")
        shown += [f"{row['tokens_per_s']:,.0f} tok/s", f"lr {row['lr']:.2e}"]
        return ", ".join(shown)


def _build_task(cfg: TrainConfig, tokenizer: Tokenizer, data_paths: list[Path],
                resume_from: tuple[int, Path] | None, say: _Say) -> Task:
    common = dict(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
    if cfg.task == "pretrain":
        from bertrt.train import data

        def collate(examples: list, indices: list[int]) -> dict[str, torch.Tensor]:
            return data.collate_pretraining(examples, indices, tokenizer, cfg.seed,
                                            mask_prob=cfg.mask_prob, whole_word=cfg.whole_word_mask)

        if cfg.eval_split:  # held-out documents of the corpus itself (a function of the seed)
            source, eval_source = data.pretraining_sources(
                data_paths, tokenizer, cfg.seq_len, cfg.seed, cfg.eval_split)
            say(f"holding out {len(eval_source.documents):,} of "
                f"{len(source.documents) + len(eval_source.documents):,} documents "
                f"(--eval-split {cfg.eval_split}) for evaluation: {len(eval_source):,} examples")
        else:
            source = data.pretraining_source(data_paths, tokenizer, cfg.seq_len, cfg.seed)
            eval_source = (data.pretraining_source([Path(p) for p in cfg.eval_data], tokenizer,
                                                   cfg.seq_len, cfg.seed)
                           if cfg.eval_data else None)
        return Task("pretrain", source, eval_source, collate, losses.pretraining_counts,
                    losses.pretraining_loss, losses.PRETRAINING_STATS, None, **common)

    from bertrt.train import tasks

    make_source, collate_fn = {
        "classify": (tasks.classification_source, tasks.collate_classification),
        "tag": (tasks.tagging_source, tasks.collate_tagging),
    }[cfg.task]
    label2id = None
    if resume_from is not None:  # keep the checkpoint's label ids
        label2id = BertConfig.from_pretrained(resume_from[1]).extra.get("label2id")
    if len(data_paths) != 1:
        raise BertrtError(f"--task {cfg.task} takes one --data file, got {len(data_paths)}")
    source, labels, truncated = make_source(data_paths[0], tokenizer, cfg.seq_len, cfg.seed,
                                            label2id=label2id)
    _warn_truncated(say, data_paths[0], truncated, cfg.seq_len)
    eval_source = None
    if cfg.eval_data:
        if len(cfg.eval_data) != 1:
            raise BertrtError(f"--task {cfg.task} takes one --eval-data file")
        eval_source, _, truncated = make_source(
            Path(cfg.eval_data[0]), tokenizer, cfg.seq_len, cfg.seed,
            label2id={name: i for i, name in enumerate(labels)})
        _warn_truncated(say, Path(cfg.eval_data[0]), truncated, cfg.seq_len)
    else:
        say(f"notice: no --eval-data: no evaluation, and no best checkpoint by "
            f"{BEST_METRIC[cfg.task]}")

    def collate(examples: list, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate_fn(examples, tokenizer.pad_id)

    return Task(cfg.task, source, eval_source, collate, losses.label_counts,
                losses.classification_loss, losses.CLASSIFICATION_STATS, list(labels), **common)


def _evaluate(net: torch.nn.Module, task: Task, cfg: TrainConfig, env: Dist,
              autocast: Any) -> dict[str, float]:
    """Metrics on the eval data, each rank a strided share, combined over ranks."""
    net.eval()
    stats = torch.zeros(len(task.stat_names), dtype=torch.float64)
    preds: list[Any] = []
    golds: list[Any] = []
    ones = torch.ones(2, dtype=torch.float64, device=env.device)  # loss sums, not means
    mine = list(range(env.rank, len(task.eval_source), env.world))
    with torch.no_grad():
        for start in range(0, len(mine), cfg.batch_size):
            indices = mine[start:start + cfg.batch_size]
            batch = task.collate([task.eval_source[i] for i in indices], indices)
            with autocast:
                outputs = net(**task.inputs(batch, env.device))
                _, batch_stats = task.loss(outputs, batch, ones)
            stats += batch_stats.cpu()
            if task.name != "pretrain":
                predicted = outputs["logits"].argmax(-1).cpu()
                _collect(task, predicted, batch["labels"], preds, golds)
    net.train()
    env.all_sum(stats)
    scores = task.summarize(stats)
    if task.name == "pretrain":
        return scores
    from bertrt.train import tasks

    preds = [p for part in env.gather(preds) for p in part]
    golds = [g for part in env.gather(golds) for g in part]
    if task.name == "classify":
        extra = tasks.classification_metrics(preds, golds, len(task.labels or []))
    else:
        extra = tasks.tagging_metrics(preds, golds)
    return {"loss": scores["loss"], **extra}


def _collect(task: Task, predicted: torch.Tensor, labels: torch.Tensor, preds: list,
             golds: list) -> None:
    if task.name == "classify":
        preds.extend(predicted.tolist())
        golds.extend(labels.tolist())
        return
    names = task.labels or []
    for p_row, g_row in zip(predicted.tolist(), labels.tolist()):
        keep = [i for i, g in enumerate(g_row) if g != losses.IGNORE]  # first sub-tokens
        preds.append([names[p_row[i]] for i in keep])
        golds.append([names[g_row[i]] for i in keep])


# ====================================================================== setup helpers
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _Say:
    """Notices for the user, from rank 0 only, to stderr (through the bar while it runs)."""

    def __init__(self, master: bool) -> None:
        self.master = master
        self.bar: tqdm | None = None

    def __call__(self, message: str) -> None:
        if not self.master:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            click.echo(message, err=True)


def _check_out(cfg: TrainConfig, out: Path) -> tuple[int, Path] | None:
    """Refuse a used OUT unless --resume/--overwrite; with --resume, its newest checkpoint."""
    if out.exists() and not out.is_dir():
        raise BertrtError(f"--out {out}: exists and is not a directory")
    if cfg.resume:
        return ckpt.latest_checkpoint(out)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise BertrtError(f"--out {out}: not empty; continue it with --resume, replace it "
                          f"with --overwrite, or choose another --out")
    return None


def _check_seq_len(cfg: TrainConfig, base: Model | None,
                   resume_from: tuple[int, Path] | None) -> None:
    if resume_from is not None:
        config, where = BertConfig.from_pretrained(resume_from[1]), str(resume_from[1])
    elif base is not None:
        config, where = base.config, str(cfg.model)
    else:
        name = cfg.preset or "tiny"
        config, where = BertConfig.preset(name), f"preset {name}"
    if config.max_position_embeddings < cfg.seq_len:
        raise BertrtError(f"--seq-len {cfg.seq_len} exceeds max_position_embeddings="
                          f"{config.max_position_embeddings} of {where}")


def _clear_outputs(out: Path) -> None:
    """Remove what a bertrt run writes into OUT (other files are left alone)."""
    for name in _RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _threads(cfg: TrainConfig, env: Dist, state: dict[str, Any] | None, say: _Say) -> int:
    saved = state.get("threads") if state else None
    if cfg.threads is not None:
        if saved is not None and saved != cfg.threads:
            say(f"notice: the checkpoint ran with --threads {saved}; with {cfg.threads} the "
                f"result is not bitwise equal to an uninterrupted run")
        return cfg.threads
    if saved is not None:
        return int(saved)
    return max(1, (os.cpu_count() or 1) // max(env.local_world, 1))


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _data_paths(cfg: TrainConfig, out: Path, env: Dist, say: _Say) -> list[Path]:
    """The training files; for pretraining without --data, the embedded corpus in OUT/data."""
    if cfg.data:
        return [Path(p) for p in cfg.data]
    from bertrt.train.corpus import embedded_corpus

    corpus = out / DATA_DIR / "corpus.txt"
    if env.master and not corpus.is_file():
        say("building the embedded corpus (docstrings of the Python standard library)...")
        corpus = embedded_corpus(out / DATA_DIR)
    env.barrier()
    return [corpus]


def _tokenizer(cfg: TrainConfig, out: Path, env: Dist, base: Model | None,
               resume_from: tuple[int, Path] | None, data_paths: list[Path],
               say: _Say) -> Tokenizer:
    """The checkpoint's, --vocab, the --model's, or a vocabulary trained on the data."""
    if resume_from is not None:
        return Tokenizer.from_dir(resume_from[1])
    if cfg.vocab is not None:
        return Tokenizer.from_vocab(cfg.vocab)
    if base is not None and base.has_tokenizer:
        return base.tokenizer
    vocab = out / DATA_DIR / "vocab.txt"
    if env.master:
        say(f"training a {cfg.vocab_size}-token WordPiece vocabulary on "
            f"{', '.join(map(str, data_paths))}...")
        if cfg.task == "pretrain":
            from bertrt.train.corpus import read_documents

            texts = (line for p in data_paths for doc in read_documents(p) for line in doc)
            tok = train_vocab(texts=texts, size=cfg.vocab_size)
        else:
            tok = train_vocab(data_paths, size=cfg.vocab_size)
        tok.save_vocab(vocab)
    env.barrier()
    return Tokenizer.from_vocab(vocab)


def _model(cfg: TrainConfig, tokenizer: Tokenizer, labels: list[str] | None, base: Model | None,
           resume_from: tuple[int, Path] | None, say: _Say) -> Model:
    """The checkpoint's model, or a fresh one (--preset), or --model's weights in a model with
    the task's head (weights it lacks initialised fresh, with a notice naming them)."""
    if resume_from is not None:
        return bertrt.load(resume_from[1], head=cfg.head)
    if base is not None:
        config = base.config
    else:
        config = BertConfig.preset(cfg.preset or "tiny", vocab_size=tokenizer.vocab_size)
    if labels is not None:
        config = config.with_labels(labels)
    model = Model.from_config(config, head=cfg.head, seed=cfg.seed, tokenizer=tokenizer)
    if base is None:
        return model
    same_head = base.head == model.head and (
        labels is None or base.config.id2label == model.config.id2label)
    fresh = []
    with torch.no_grad():
        for name, tensor in model.weights.items():
            source = _find_weight(base.weights, name)
            head_param = name.startswith(HEAD_PREFIXES)
            if source is not None and source.shape == tensor.shape and (
                    same_head or not head_param):
                tensor.copy_(source)
            else:
                fresh.append(name)
    if fresh:
        say(f"notice: {cfg.model} has no weights for {', '.join(fresh)}; initialised fresh "
            f"for the {model.head} head")
    return model


def _find_weight(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    bare = name.removeprefix("bert.")
    for candidate in (name, bare, "bert." + bare):
        if candidate in weights:
            return weights[candidate]
    return None


def _lower(model: Model, checkpoint_activations: bool) -> torch.nn.Module:
    """`model.to_torch()`; with activation checkpointing, each encoder layer's activations are
    recomputed in the backward pass instead of kept (memory for compute)."""
    return model.to_torch(checkpoint_layers=checkpoint_activations)


# ====================================================================== logging and the end
def _warn_truncated(say: _Say, path: Path, truncated: int, seq_len: int) -> None:
    if truncated:
        say(f"warning: {path}: {truncated} input(s) longer than --seq-len {seq_len} were "
            f"truncated")


def _non_finite(what: str, step: int, out: Path) -> TrainingError:
    latest = ckpt.latest_checkpoint(out)
    kept = (f"the last good checkpoint is kept: {latest[1]} (step {latest[0]}); continue "
            f"from it with --resume, or start again with a lower --lr"
            if latest else "no checkpoint had been saved yet; try a lower --lr")
    return TrainingError(f"step {step}: {what}; training stopped, {kept}")


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    """Timings to 4 significant digits; losses and metrics exact (runs are compared); a
    non-finite number (an fp16 step skipped for overflow) as null, which JSON can hold."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif key in ("tokens_per_s", "elapsed_s"):
            value = float(f"{value:.4g}")
        out[key] = value
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= `step` (those the resumed checkpoint had seen)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _last_metrics(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[-1]) if lines else {}


def _plot(out: Path) -> Path | None:
    """`OUT/loss.png`: the loss (and eval loss) curve, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / LOSS_PNG, dpi=100)
    plt.close(fig)
    return out / LOSS_PNG


def _report(cfg: TrainConfig, out: Path, model: Model, last: dict[str, Any], best: float | None,
            png: Path | None, seconds: float, say: _Say) -> None:
    minutes, secs = divmod(int(seconds), 60)
    parts = [f"loss {last['loss']:.3f}"] if "loss" in last else []
    if "mlm_acc" in last:
        parts += [f"MLM acc {last['mlm_acc']:.1%}", f"NSP acc {last['nsp_acc']:.1%}"]
    if "accuracy" in last:
        parts.append(f"acc {last['accuracy']:.1%}")
    click.echo(f"done: {cfg.max_steps} steps in {minutes}m{secs:02d}s; {', '.join(parts)}")
    click.echo(f"model ({model.head} head, Hugging Face layout): {out}")
    click.echo(f"metrics: {out / METRICS}" + (f", curve: {png}" if png else ""))
    if best is not None:
        click.echo(f"best checkpoint by eval {BEST_METRIC[cfg.task]} ({best:.4f}): "
                   f"{out / ckpt.BEST}")
    click.echo("next:")
    click.echo(f"  bertrt export {out / 'model.onnx'} --model {out}")
    click.echo(f"  bertrt serve-bench {out / 'model.onnx'}")
