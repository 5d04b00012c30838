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

On CUDA the host runs ahead of the device: a step's numbers (loss, metrics, gradient norm) stay
on the device and are read, with every step's since the last read, only where a row is written
or checked (the first step, every --log-every, evaluations, checkpoints, the last step); a
non-finite loss is found there and named by its step, before any checkpoint could save it. Off
a GPU a read costs nothing, and every step is read (and checked) as it ends.
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
from bertrt.train.task import TASKS, Task, pack, to_device

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
    setup.configure_device(env)
    try:
        return _train(cfg.for_device(env.device.type == "cuda"), env, on_step)
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
    net: torch.nn.Module  # the model's module (padded): evaluation, stages
    stepper: torch.nn.Module  # what the steps run: `net`, or its packed form (--packed)
    module: torch.nn.Module  # DDP's wrapper of `stepper`, or `stepper` itself
    opt: Optimization
    threads: int
    best: float | None  # the best eval score so far (fine-tuning)
    plan: stages.Plan  # which parameters each stage trains (`--freeze`, `--stages`)
    stage: int  # the stage the module and optimizer are set up for
    say: report.Say

    @property
    def eager(self) -> bool:
        """Read each step's numbers as it ends: off a GPU nothing runs ahead of the host, so
        the read costs nothing (see the module's docstring)."""
        return self.env.device.type != "cuda"


@dataclass
class _Done:
    """An optimizer step whose numbers may still be on the device."""

    step: int  # steps done with it (1-based)
    t0: float  # when it began (perf_counter)
    stats: torch.Tensor  # the task's summed statistics and the token positions, all ranks
    grad_norm: torch.Tensor
    lr: float
    stage: int | None  # the stage it trained (1-based), when staged


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
    lowered = setup.lower(model, cfg, env, plan.trainable[stage])
    net = lowered.net
    opt = setup.optimization(cfg, model, net, env, begin.state, say)
    # resumed at a boundary: the parameters the stage freezes give up their saved state
    stages.apply(net, plan.trainable[stage], opt.optimizer)
    setup.open_out(begin, env, tokenizer if trained else None)
    run = _Run(cfg, env, begin.work, begin.replaces, task, model, net, lowered.stepper,
               lowered.module, opt, threads, begin.best, plan, stage, say)

    # ------------------------------------------------------------------ the loop
    if env.master:
        report.write_run_record(cfg, begin.work, env, threads, model, task,
                                [begin.final(p) for p in data_paths], begin.step, say)
    if cfg.freeze or cfg.stages:
        say(plan.describe(stage, _sizes(net)))
    done = begin.step
    pending: list[_Done] = []  # steps not read yet
    try:
        with report.Progress(cfg, begin.work, begin.step, task, say, t_start) as progress:
            for step in range(begin.step, cfg.max_steps):
                pending.append(_step(run, step))
                done = step + 1
                if on_step is not None:
                    on_step(done)
                final = done == cfg.max_steps
                evaluate = task.eval_source is not None and (done % cfg.eval_every == 0
                                                             or final)
                save = done % cfg.save_every == 0 or final
                # the same steps on every rank: a read may stop the run, which all must do
                if run.eager or evaluate or save or progress.writes(done):
                    rows = _read(run, pending)
                    pending.clear()
                    if evaluate:
                        rows[-1].update(_evaluate(run, done))
                    for row in rows:
                        progress.log(row)
                if save:
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


def _step(run: _Run, step: int) -> _Done:
    """Optimizer step `step` (0-based) over its micro-batches."""
    cfg, env, task, opt = run.cfg, run.env, run.task, run.opt
    t0 = time.perf_counter()
    if run.plan.stage_at(step) != run.stage:
        _enter_stage(run, run.plan.stage_at(step))
    # The step's micro-batches first: the loss denominators count all of them.
    batches = [task.batch(step, micro, env) for micro in range(cfg.grad_accum)]
    # non-blocking: a blocking host-to-device copy waits for the device's queue to drain
    counts = sum(task.counts(b) for b in batches).to(env.device, non_blocking=True)
    denominators = env.all_sum(counts) / env.world  # DDP averages over ranks
    positions = sum(b["input_ids"].numel() for b in batches)  # token positions, padding included
    # Nothing padded: the forward runs without a mask (its fastest attention); asked here, of
    # the host's copy, since the module cannot ask a device mask without a host sync.
    unpadded = ["attention_mask" in b and bool(b["attention_mask"].all()) for b in batches]
    if cfg.packed:
        batches = [pack(b) for b in batches]
    batches = [to_device(b, env.device) for b in batches]
    # summed on the device, and read when a row is written (`_read`)
    stats = torch.zeros(len(task.stat_names) + 1, dtype=torch.float64, device=env.device)
    for micro, batch in enumerate(batches):
        last_micro = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last_micro or not env.enabled else (
            run.module.no_sync())  # type: ignore[operator]
        inputs = task.inputs(batch, env.device)
        if unpadded[micro] and not cfg.packed:
            del inputs["attention_mask"]
        with sync:
            with opt.autocast:
                outputs = run.module(**inputs)
                loss, micro_stats = task.loss(outputs, batch, denominators)
            opt.scaler.scale(loss).backward()
        stats[:-1] += micro_stats
    stats[-1] += positions
    stats = env.all_sum(stats)
    if run.eager:  # before the update, as the update would spread a NaN to every parameter
        _check_loss(run, step + 1, stats)
    grad_norm, lr = _update(run, step)
    return _Done(step + 1, t0, stats, grad_norm, lr,
                 run.stage + 1 if run.plan.staged else None)


def _check_loss(run: _Run, step: int, stats: torch.Tensor) -> dict[str, float]:
    """The step's metrics from its summed `stats`; a non-finite loss stops the run."""
    metrics = run.task.summarize(stats[:-1].cpu())
    if not math.isfinite(metrics["loss"]):
        raise _non_finite(f"the loss is {metrics['loss']}", step, run)
    return metrics


def _read(run: _Run, pending: list[_Done]) -> list[dict[str, Any]]:
    """The rows of the `pending` steps, read from the device at once (one host sync), each
    checked as the step that made it would have been; tokens/s is over all of them."""
    values = torch.stack([torch.cat([d.stats, d.grad_norm.double().reshape(1)])
                          for d in pending]).cpu()
    seconds = time.perf_counter() - pending[0].t0
    tokens_per_s = float(values[:, -2].sum()) / seconds
    rows = []
    for done, row_values in zip(pending, values):
        metrics = _check_loss(run, done.step, row_values[:-1])
        grad_norm = float(row_values[-1])
        if not math.isfinite(grad_norm) and not run.opt.scaler.is_enabled():
            raise _non_finite(f"the gradient norm is {grad_norm}", done.step, run)
        row = {"step": done.step, "loss": metrics["loss"], "lr": done.lr,
               "tokens_per_s": tokens_per_s, **metrics, "grad_norm": grad_norm}
        if done.stage is not None:
            row["stage"] = done.stage
        rows.append(row)
    return rows


def _enter_stage(run: _Run, stage: int) -> None:
    """Between two steps: train the parameters of `stage` (fresh optimizer state for those
    that join, none kept for those that leave), with a DDP wrapper that reduces them."""
    stages.apply(run.net, run.plan.trainable[stage], run.opt.optimizer)
    run.module = setup.wrap(run.stepper, run.env)
    run.stage = stage
    run.say(run.plan.describe(stage, _sizes(run.net)))


def _sizes(net: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in net.named_parameters()}


def _update(run: _Run, step: int) -> tuple[torch.Tensor, float]:
    """Clip and apply the gradients, advance the schedule; the gradient norm (on the device)
    and the lr used."""
    opt = run.opt
    opt.scaler.unscale_(opt.optimizer)
    max_norm = run.cfg.clip if run.cfg.clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(opt.params, max_norm)
    if run.eager and not opt.scaler.is_enabled() and not math.isfinite(float(grad_norm)):
        raise _non_finite(f"the gradient norm is {float(grad_norm)}", step + 1, run)
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
    if not bool(torch.stack([torch.isfinite(p).all() for p in opt.params]).all()):
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
