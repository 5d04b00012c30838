"""The training loop of `bertrt train`: pre-training (MLM + NSP) and fine-tuning.

It reads top to bottom as nanoGPT's `train.py` does: distributed setup from torchrun's
environment, the output folder, the tokenizer, the data, the model, the optimizer (all in
`setup`), then the loop — gradient sync only on the last micro-step, logging (`report`) and
checkpoints on rank 0 — and at the end the final model written as `OUT` itself. What differs
between tasks is behind `task.Task`.

What makes N processes equal to one, and a resumed run equal to an uninterrupted one:

* which examples form a step, and how they are masked, depend on `--seed` and the global
  example index only (`data.batch_indices`, `data.collate_pretraining`), not on the ranks;
* every loss is normalised by the count of its items over the whole step, all-reduced before
  the forward (`losses`), so micro-batch and rank boundaries do not weigh items differently;
* the only per-rank randomness is dropout, seeded `seed + rank`, and its RNG state is saved for
  every rank in each checkpoint with the optimizer, scheduler and GradScaler states.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import bertrt
from bertrt.errors import BertrtError
from bertrt.model import Model
from bertrt.train import checkpoint as ckpt
from bertrt.train import outdir, report, setup, stages
from bertrt.train.config import TrainConfig, config_hash
from bertrt.train.setup import Dist, Optimization, is_distributed_launch
from bertrt.train.task import TASKS, Task

__all__ = ["Dist", "TrainingError", "is_distributed_launch", "train"]


class TrainingError(BertrtError):
    """Training cannot go on (a non-finite loss, say); nothing saved before is lost."""


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> Path:
    """Run `cfg` to `max_steps` (or resume it) and return `OUT`, the final model dir.

    Args:
        cfg: the settings.
        on_step: called with the number of optimizer steps done, right after each step and
            before that step is evaluated, logged or checkpointed (tests stop a run there).
    """
    env = setup.setup_distributed()
    try:
        return _train(cfg, env, on_step)
    finally:
        if env.enabled and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """What the step, the evaluation and the checkpoint of a run share."""

    cfg: TrainConfig
    env: Dist
    out: Path  # where the run writes: OUT, or the folder that replaces it (--overwrite)
    replaces: bool  # --overwrite: `out` becomes OUT once the run is complete
    task: Task
    model: Model
    net: torch.nn.Module  # the model's module; `module` is DDP's wrapper of it, or itself
    module: torch.nn.Module
    opt: Optimization
    threads: int
    best: float | None  # the best eval score so far (fine-tuning)
    plan: stages.Plan  # which parameters each stage trains (`--freeze`, `--stages`)
    stage: int  # the stage the module and optimizer are set up for
    say: report.Say


def _train(cfg: TrainConfig, env: Dist, on_step: Callable[[int], None] | None) -> Path:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    say = report.Say(env.master)

    # ------------------------------------------------------------------ where the run starts
    # Every rank checks the settings and OUT (and loads a resumed checkpoint) first.
    begin = setup.start(cfg, out, env)
    if begin.resumed and begin.step >= cfg.max_steps:
        return _finished(cfg, begin, env, say)
    if cfg.resume:
        say(f"resuming from step {begin.step} (checkpoint {begin.where})" if begin.resumed
            else f"notice: {out} has no complete checkpoint; starting from step 0")
    try:
        return _run(cfg, env, begin, say, on_step, t_start)
    except BaseException:
        if env.master:
            setup.discard_out(begin)  # an --overwrite run that failed: OUT stays as it was
        raise


def _run(cfg: TrainConfig, env: Dist, begin: setup.Start, say: report.Say,
         on_step: Callable[[int], None] | None, t_start: float) -> Path:
    # ------------------------------------------------------------------ threads and seeds
    threads = setup.threads(cfg, env, begin.state, say)
    torch.set_num_threads(threads)
    # Dropout is the only per-rank randomness; data order and masking are global (seeded
    # by --seed and the example index), so they do not depend on the rank.
    setup.seed_everything(cfg.seed + env.rank)

    # ------------------------------------------------------------------ tokenizer, data, model
    # All read and checked before the run writes a file (the embedded corpus aside: nothing
    # of the user's to check, and it is written into the run's folder).
    kind = TASKS[cfg.task]
    data_paths = setup.data_paths(cfg, begin, env, say)
    tokenizer, trained = setup.choose_tokenizer(cfg, env, begin, data_paths, kind.train_vocab,
                                                say)
    task = kind.build(cfg, tokenizer, data_paths, begin.label2id, say)
    model = setup.build_model(cfg, tokenizer, task.labels, begin, say)
    plan = stages.plan(model.graph, cfg.freeze, cfg.stages, cfg.max_steps)
    stage = plan.stage_at(begin.step)
    net, module = setup.lower(model, cfg, env, plan.trainable[stage])
    opt = setup.optimization(cfg, model, net, env, begin.state, say)
    # resumed at a boundary: the parameters the stage freezes give up their saved state
    stages.apply(net, plan.trainable[stage], opt.optimizer)
    setup.open_out(begin, env, tokenizer if trained else None)
    run = _Run(cfg, env, begin.work, begin.replaces, task, model, net, module, opt, threads,
               begin.best, plan, stage, say)

    # ------------------------------------------------------------------ the loop
    if env.master:
        report.write_run_record(cfg, begin.work, env, threads, model, task,
                                [begin.final(p) for p in data_paths], begin.step, say)
    if cfg.freeze or cfg.stages:
        say(plan.describe(stage, _sizes(net)))
    done = begin.step
    try:
        with report.Progress(cfg, begin.work, begin.step, task, say, t_start) as progress:
            for step in range(begin.step, cfg.max_steps):
                row = _step(run, step)
                done = step + 1
                if on_step is not None:
                    on_step(done)
                final = done == cfg.max_steps
                if task.eval_source is not None and (done % cfg.eval_every == 0 or final):
                    row.update(_evaluate(run, done))
                progress.log(row)
                if done % cfg.save_every == 0 or final:
                    _checkpoint(run, done)
    except KeyboardInterrupt:
        report.interrupted(cfg, begin, done, env.world, say)
        raise

    # ------------------------------------------------------------------ the final model
    if env.master:
        model.save(begin.work)
        png = report.plot(begin.work)
        setup.finish_out(begin)  # --overwrite: the complete new run replaces OUT now
        report.summary(cfg, begin.out, model, task, progress.last, run.best,
                       png and begin.final(png), time.perf_counter() - t_start)
    env.barrier()
    return begin.out


def _finished(cfg: TrainConfig, begin: setup.Start, env: Dist, say: report.Say) -> Path:
    """--resume of a run that has reached --max-steps: nothing to train (the final model
    written if a stop came between the last checkpoint and it)."""
    if env.master:
        if not all((begin.out / name).is_file() for name in outdir.MODEL_FILES):
            begin.model.save(begin.out)  # type: ignore[union-attr]
        say(f"{begin.out}: the run is finished ({begin.step} of {cfg.max_steps} steps), "
            f"nothing to train; its model is {begin.out}. To train it further, start a new "
            f"run from it: bertrt train --model {begin.out} --out NEW_DIR ...")
    env.barrier()
    return begin.out


def _step(run: _Run, step: int) -> dict[str, Any]:
    """Optimizer step `step` (0-based) over its micro-batches; its row of metrics."""
    cfg, env, task, opt = run.cfg, run.env, run.task, run.opt
    t0 = time.perf_counter()
    if run.plan.stage_at(step) != run.stage:
        _enter_stage(run, run.plan.stage_at(step))
    # The step's micro-batches first: the loss denominators count all of them.
    batches = [task.batch(step, micro, env) for micro in range(cfg.grad_accum)]
    counts = sum(task.counts(b) for b in batches).to(env.device)
    denominators = env.all_sum(counts) / env.world  # DDP averages over ranks
    # summed on the device: one host sync per step (below), not one per micro-step
    stats = torch.zeros(len(task.stat_names) + 1, dtype=torch.float64, device=env.device)
    for micro, batch in enumerate(batches):
        last_micro = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last_micro or not env.enabled else (
            run.module.no_sync())  # type: ignore[operator]
        with sync:
            with opt.autocast:
                outputs = run.module(**task.inputs(batch, env.device))
                loss, micro_stats = task.loss(outputs, batch, denominators)
            opt.scaler.scale(loss).backward()
        stats[:-1] += micro_stats
        stats[-1] += batch["input_ids"].numel()  # token positions, padding included
    stats = env.all_sum(stats).cpu()
    metrics = task.summarize(stats[:-1])  # the step's, over all ranks
    if not math.isfinite(metrics["loss"]):
        raise _non_finite(f"the loss is {metrics['loss']}", step + 1, run)
    grad_norm, lr = _update(run, step)
    row = {"step": step + 1, "loss": metrics["loss"], "lr": lr,
           "tokens_per_s": float(stats[-1]) / (time.perf_counter() - t0), **metrics,
           "grad_norm": grad_norm}
    if run.plan.staged:
        row["stage"] = run.stage + 1
    return row


def _enter_stage(run: _Run, stage: int) -> None:
    """Between two steps: train the parameters of `stage` (fresh optimizer state for those
    that join, none kept for those that leave), with a DDP wrapper that reduces them."""
    stages.apply(run.net, run.plan.trainable[stage], run.opt.optimizer)
    run.module = setup.wrap(run.net, run.env)
    run.stage = stage
    run.say(run.plan.describe(stage, _sizes(run.net)))


def _sizes(net: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in net.named_parameters()}


def _update(run: _Run, step: int) -> tuple[float, float]:
    """Clip and apply the gradients, advance the schedule; the gradient norm and the lr used."""
    opt = run.opt
    opt.scaler.unscale_(opt.optimizer)
    max_norm = run.cfg.clip if run.cfg.clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(opt.params, max_norm))
    if not math.isfinite(grad_norm) and not opt.scaler.is_enabled():
        raise _non_finite(f"the gradient norm is {grad_norm}", step + 1, run)
    lr = opt.scheduler.get_last_lr()[0]
    opt.scaler.step(opt.optimizer)  # with fp16 a step with inf gradients is skipped
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scheduler.step()
    return grad_norm, lr


def _evaluate(run: _Run, done: int) -> dict[str, float]:
    """The eval scores as `eval_*` keys; a better `best_metric` rewrites `OUT/best`."""
    scores = run.task.evaluate(run.net, run.cfg.batch_size, run.env, run.opt.autocast)
    metric = run.task.best_metric
    if metric is not None and (run.best is None or scores[metric] > run.best):
        run.best = scores[metric]
        if run.env.master:
            ckpt.save_model_dir(run.model, run.out / ckpt.BEST,
                                {"eval.json": {"step": done, **scores}})
    return {f"eval_{k}": v for k, v in scores.items()}


def _checkpoint(run: _Run, done: int) -> None:
    """`OUT/checkpoints/step-<done>`: the model and everything an exact resume needs."""
    cfg, env, opt = run.cfg, run.env, run.opt
    if not all(bool(torch.isfinite(p).all()) for p in opt.params):
        raise _non_finite("the parameters are no longer finite", done, run)
    rng = env.gather(ckpt.rng_state())  # every rank's dropout RNG
    if env.master:
        ckpt.save_checkpoint(run.out, done, run.model, {
            "step": done,
            "trajectory": cfg.trajectory(env.world),
            "config_hash": config_hash(cfg.trajectory(env.world)),
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "rng": rng,
            # Examples are a pure function of (seed, index): the position is all the data
            # state there is.
            "data": {"next_step": done,
                     "examples_seen": done * cfg.batch_size * cfg.grad_accum * env.world},
            "threads": run.threads,
            "stage": run.plan.stage_at(done),  # the stage the next step runs (0-based)
            "world_size": env.world,
            "best": run.best,
            "bertrt_version": bertrt.__version__,
        }, keep=cfg.keep)
    env.barrier()


def _non_finite(what: str, step: int, run: _Run) -> TrainingError:
    latest = ckpt.latest_checkpoint(run.out)
    if run.replaces:
        kept = (f"--out {run.cfg.out} keeps the earlier run (--overwrite replaces it only with a "
                f"complete one); start again with a lower --lr")
    elif latest:
        kept = (f"the last good checkpoint is kept: {latest[1]} (step {latest[0]}); continue "
                f"from it with --resume, or start again with a lower --lr")
    else:
        kept = "no checkpoint had been saved yet; try a lower --lr"
    return TrainingError(f"step {step}: {what}; training stopped, {kept}")
