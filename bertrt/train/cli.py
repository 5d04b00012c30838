"""`bertrt train`: the click command over `bertrt.train.loop.train`.

The main CLI registers it (`main.add_command(train)` in `bertrt/cli.py`); it also runs alone as
`python -m bertrt.train.cli`, which is what `--nproc N` hands to torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from bertrt.config import PRESETS
from bertrt.errors import user_errors
from bertrt.train.config import OPTIMIZERS, PRECISIONS, SCHEDULES, TASKS, TrainConfig

_PATH = click.Path(path_type=str)


@click.command()
@click.option("--task", type=click.Choice(TASKS), default="pretrain", show_default=True,
              help="pretrain (MLM + NSP), classify (sequence labels) or tag (token labels).")
@click.option("--data", multiple=True, type=_PATH,
              help="Training file(s). Pretrain: text (a sentence per line, blank line between "
                   "documents) or JSONL with 'text'; none = the embedded corpus. Classify: "
                   ".csv/.tsv/.jsonl (text, text_pair, label). Tag: CoNLL.")
@click.option("--eval-data", multiple=True, type=_PATH, help="Held-out file(s) to evaluate.")
@click.option("--eval-split", type=float,
              help="Pretrain: hold out this fraction of the documents (by --seed) to evaluate, "
                   "in [0, 0.5) [default: 0.02 for the embedded corpus, else 0].")
@click.option("--model", "model_dir", type=_PATH,
              help="Start from this Hugging Face-layout BERT dir (missing heads start fresh).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              help="Start from a fresh model of this size [default: tiny].")
@click.option("--vocab", type=_PATH, help="vocab.txt (default: the model's, else trained).")
@click.option("--vocab-size", default=8000, show_default=True, type=click.IntRange(min=10),
              help="Size of a freshly trained vocabulary.")
@click.option("--out", default="bertrt-out", show_default=True, type=_PATH,
              help="Output dir: checkpoints/, metrics.jsonl, run.json; at the end the model.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Examples per micro-batch, per process.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=8))
@click.option("--max-steps", default=800, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", type=float, help="Peak learning rate [default: 1e-3 pretrain, 1e-4 "
                                       "fine-tuning].")
@click.option("--weight-decay", default=0.01, show_default=True, type=float,
              help="AdamW/LAMB weight decay (never on biases and LayerNorm).")
@click.option("--warmup", default=0.1, show_default=True, type=float,
              help="Linear warm-up, as a fraction of --max-steps.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="linear", show_default=True,
              help="Decay after warm-up: linear, or poly (quadratic).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1),
              help="Micro-batches per optimizer step.")
@click.option("--clip", default=1.0, show_default=True, type=float,
              help="Gradient-norm clipping (0: off).")
@click.option("--save-every", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--keep", default=3, show_default=True, type=click.IntRange(min=1),
              help="Checkpoints kept (the newest).")
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--eval-every", type=click.IntRange(min=1), help="[default: --save-every]")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", type=click.IntRange(min=1),
              help="Torch threads per process [default: the checkpoint's, else cores/procs].")
@click.option("--checkpoint-activations", is_flag=True,
              help="Recompute encoder layers in the backward pass (less memory).")
@click.option("--mask-prob", default=0.15, show_default=True, type=float)
@click.option("--whole-word-mask", is_flag=True, help="Mask whole words.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run's outputs in --out.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes on this machine (launches torchrun; data parallel).")
@user_errors
def train(model_dir: str | None, **options: object) -> None:
    """Pre-train (MLM + NSP) or fine-tune a BERT model.

    With no arguments: the tiny preset with a fresh vocabulary, pre-trained on the docstrings
    of the Python standard library, in a few minutes on 2 cores; the result is ./bertrt-out.
    """
    from bertrt.train import loop

    cfg = TrainConfig(model=model_dir, **options)  # type: ignore[arg-type]
    if cfg.nproc > 1 and not loop.is_distributed_launch():
        sys.exit(_launch(cfg))
    loop.train(cfg)


def _launch(cfg: TrainConfig) -> int:
    """Run this command under torchrun with `cfg.nproc` processes; returns its exit code."""
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nproc)
    argv = cfg.to_argv()
    if cfg.threads is None:
        argv += ["--threads", str(threads)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(cfg.nproc), "-m", "bertrt.train.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    root = str(Path(__file__).resolve().parents[2])  # the workers import this very bertrt
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    click.echo(f"launching {cfg.nproc} processes: torchrun --standalone --nproc-per-node "
               f"{cfg.nproc} -m bertrt.train.cli ...", err=True)
    code = subprocess.call(cmd, env=env)
    return 0 if code == 0 else 2


if __name__ == "__main__":  # pragma: no cover
    train()
