"""`bertrt train`: the click command over `bertrt.train.loop.train`.

The main CLI registers it (`main.add_command(train)` in `bertrt/cli.py`); it also runs alone as
`python -m bertrt.train.cli`, which is what `--nproc N` hands to torchrun.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bertrt.errors import user_errors
from bertrt.train.config import TrainConfig

_PATH = click.Path(path_type=str)


def _option(f: dataclasses.Field, hint: Any) -> Callable[[Callable], Callable]:
    """The click option of one `TrainConfig` field: its flag, type, default and help (which
    ends with the default: click's, or the field's `shown` words)."""
    if isinstance(hint, types.UnionType):  # `X | None`: a setting with a computed default
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kind = typing.get_origin(hint) or hint
    flag = "--" + f.name.replace("_", "-")
    shown = f.metadata.get("shown", "off" if f.default is False else None)
    settings: dict[str, Any] = {"help": f.metadata["help"] + (
        f"  [default: {shown}]" if shown is not None else "")}
    if kind is bool and f.default is None:  # an on/off switch whose default is computed
        flag = f"{flag}/--no-{flag[2:]}"
        settings["default"] = None
    elif kind is bool:
        settings["is_flag"] = True
    elif kind is tuple:
        settings.update(multiple=True, type=_PATH)
    elif kind is int:
        settings["type"] = click.IntRange(min=f.metadata["min"])
    elif kind is float:
        settings["type"] = float
    else:
        choices = f.metadata.get("choices")
        settings["type"] = click.Choice(choices) if choices else _PATH
    if "metavar" in f.metadata:
        settings["metavar"] = f.metadata["metavar"]
    if f.default is not None and kind not in (bool, tuple):
        settings.update(default=f.default, show_default=True)
    return click.option(flag, **settings)


def _train_options(command: Callable) -> Callable:
    """One option per `TrainConfig` field that has a help text, in field order."""
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed(dataclasses.fields(TrainConfig)):
        if "help" in f.metadata:
            command = _option(f, hints[f.name])(command)
    return command


@click.command()
@_train_options
@user_errors
def train(**options: Any) -> None:
    """Pre-train (MLM + NSP) or fine-tune a BERT model.

    With no arguments: the tiny preset with a fresh vocabulary, pre-trained on the docstrings
    of the Python standard library, in a few minutes on 2 cores; the result is ./bertrt-out.
    """
    from bertrt.train import loop

    cfg = TrainConfig(**options)
    if cfg.nproc > 1 and not loop.is_distributed_launch():
        sys.exit(_launch(cfg))
    try:
        loop.train(cfg)
    except KeyboardInterrupt:  # the loop has said where the run stands
        sys.exit(130)


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
