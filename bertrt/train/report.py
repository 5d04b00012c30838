"""What a training run tells its user, all from rank 0: notices, `OUT/run.json`, the progress
bar and `OUT/metrics.jsonl` (`Progress`), the loss curve `OUT/loss.png` and the closing summary.

A task names the metrics shown beside the loss in its `shown` rows (see `bertrt.train.task`).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import click
import torch
from tqdm import tqdm

import bertrt
from bertrt.fileio import atomic_write_text
from bertrt.train import checkpoint as ckpt
from bertrt.train.config import TrainConfig, config_hash

if TYPE_CHECKING:
    from bertrt.model import Model
    from bertrt.train.setup import Dist, Start
    from bertrt.train.task import Task

METRICS = "metrics.jsonl"
RUN = "run.json"
LOSS_PNG = "loss.png"


class Say:
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


def write_run_record(cfg: TrainConfig, out: Path, env: Dist, threads: int, model: Model,
                     task: Task, data_paths: list[Path], start_step: int, say: Say) -> None:
    """`OUT/run.json` (every setting, the world, the model, the data, versions) and the line
    that says what is trained."""
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
        f"{cfg.seq_len}; {threads} thread(s); out: {cfg.out}")


class Progress:
    """The progress bar and `metrics.jsonl` of a run, as a context manager; on ranks other
    than 0 it shows and writes nothing.

    The bar is drawn on a terminal only (or as `--progress/--no-progress` say); without it, a
    line per checkpoint shows the same numbers, so a redirected log stays readable. Resuming
    from step k, the metrics of later steps (written before a kill) are dropped first.
    """

    def __init__(self, cfg: TrainConfig, out: Path, start_step: int, task: Task, say: Say,
                 t_start: float) -> None:
        self.cfg, self.task, self.say, self.t_start = cfg, task, say, t_start
        self.master = say.master
        path = out / METRICS
        if self.master:
            _truncate_metrics(path, start_step)
        self.file = open(path, "a", encoding="utf-8") if self.master else None  # noqa: SIM115
        #: The last row shown (the summary's numbers).
        self.last: dict[str, Any] = _last_metrics(path) if self.master else {}
        self.shown = self.master and (sys.stderr.isatty() if cfg.progress is None
                                      else cfg.progress)
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not self.shown,
                        dynamic_ncols=True, unit="step", file=sys.stderr)
        if self.shown:
            say.bar = self.bar

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.bar.close()
        self.say.bar = None
        if self.file is not None:
            self.file.close()

    def writes(self, done: int) -> bool:
        """Whether the row of step `done` goes to `metrics.jsonl` (as do eval steps')."""
        return done == 1 or done % self.cfg.log_every == 0 or done == self.cfg.max_steps

    def log(self, row: dict[str, Any]) -> None:
        """Show step `row["step"]`; write it on the first, every --log-every, the last step
        and steps with an evaluation."""
        if not self.master:
            return
        done = row["step"]
        self.bar.update(1)
        self.bar.set_postfix_str(postfix(self.task, row), refresh=False)
        if not self.shown and (done % self.cfg.save_every == 0 or done == self.cfg.max_steps):
            self.say(f"step {done}/{self.cfg.max_steps}: {postfix(self.task, row)}")
        if self.writes(done) or "eval_loss" in row:
            row["elapsed_s"] = time.perf_counter() - self.t_start
            self.file.write(json.dumps(_rounded(row)) + "\n")  # type: ignore[union-attr]
            self.file.flush()  # type: ignore[union-attr]
        self.last = row


def postfix(task: Task, row: dict[str, Any]) -> str:
    """The bar's text: loss, the task's metrics, tokens/s and the learning rate."""
    shown = [f"loss {row['loss']:.3f}", *(f"{bar} {row[key]:{task.shown_format}}"
                                          for key, bar, _ in task.shown if key in row),
             f"{row['tokens_per_s']:,.0f} tok/s", f"lr {row['lr']:.2e}"]
    return ", ".join(shown)


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


def plot(out: Path) -> Path | None:
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


def summary(cfg: TrainConfig, out: Path, model: Model, task: Task, last: dict[str, Any],
            best: float | None, png: Path | None, seconds: float) -> None:
    """The closing lines: steps, time and the held-out evaluation (else the last batch's
    numbers); where the model, metrics, curve and best checkpoint are; the commands that come
    next."""
    minutes, secs = divmod(int(seconds), 60)
    click.echo(f"done: {cfg.max_steps} steps in {minutes}m{secs:02d}s; {scores(task, last)}")
    click.echo(f"model ({model.head} head, Hugging Face layout): {out}")
    click.echo(f"metrics: {out / METRICS}" + (f", curve: {png}" if png else ""))
    if best is not None:
        click.echo(f"best checkpoint by eval {task.best_metric} ({best:.4f}): "
                   f"{out / ckpt.BEST}")
    click.echo("next:")
    click.echo(f"  bertrt export {out / 'model.onnx'} --model {out}")
    click.echo(f"  bertrt serve-bench {out / 'model.onnx'}")
    click.echo(f"  bertrt inspect {out} --batch 8 --seq 128")


def scores(task: Task, row: dict[str, Any]) -> str:
    """A row's numbers in words: its evaluation when it has one, else its training batch's."""
    held_out = "eval_loss" in row
    key = "eval_{}" if held_out else "{}"
    parts = [f"loss {row[key.format('loss')]:.3f}"]
    parts += [f"{label} {row[key.format(name)]:{task.shown_format}}"
              for name, _, label in task.shown if key.format(name) in row]
    return "eval " + ", eval ".join(parts) if held_out else "last batch: " + ", ".join(parts)


def interrupted(cfg: TrainConfig, begin: Start, done: int, world: int, say: Say) -> None:
    """After Ctrl-C: where the run's newest checkpoint is, and the command that continues it
    (an --overwrite run instead leaves OUT as it was)."""
    if begin.replaces:
        say(f"interrupted at step {done}; --out {begin.out} keeps the earlier run "
            f"(--overwrite replaces it only with a complete one)")
        return
    latest = ckpt.latest_checkpoint(begin.work)
    say(f"interrupted at step {done}; " + (
        f"the last checkpoint is {latest[1]} (step {latest[0]})" if latest
        else "no checkpoint was written yet"))
    argv = [a for a in cfg.to_argv(changed_only=True) if a not in ("--overwrite", "--resume")]
    if world > 1:
        argv += ["--nproc", str(world)]
    say(f"continue with: bertrt train {shlex.join([*argv, '--resume'])}")
