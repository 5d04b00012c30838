"""Checkpoints: `OUT/checkpoints/step-N/`, each a Hugging Face-layout model dir plus
`training_state.pt` (optimizer, scheduler, GradScaler, every rank's RNG states, the data
position, the step, the thread count and the run's settings).

A checkpoint is written into a temporary folder that is renamed to `step-N` only once every file
is on disk, so a `step-N` folder is always complete, whenever the process died. The state holds
only tensors, numbers, strings and containers of them: it loads with `torch.load(...,
weights_only=True)`, which never runs pickled code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertrt.errors import BertrtError
from bertrt.model import Model

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
#: What a complete checkpoint folder holds.
REQUIRED = ("config.json", "model.safetensors", STATE_FILE)


def checkpoint_root(out: Path) -> Path:
    return Path(out) / CHECKPOINTS


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out`, oldest first, as (step, folder)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and all((child / f).is_file() for f in REQUIRED):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint in `out`, or None."""
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_model_dir(model: Model, target: Path, files: dict[str, Any] | None = None) -> Path:
    """Write `model` (and `files`: name -> object, `*.json` names as JSON, others through
    `torch.save`) as the folder `target`, atomically: into a temporary sibling, then renamed.
    An older `target` is replaced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save(tmp)
    for name, obj in (files or {}).items():
        if name.endswith(".json"):
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        else:
            torch.save(obj, tmp / name)
    _fsync_tree(tmp)
    old = None
    if target.exists():
        old = target.parent / f"{TMP_PREFIX}old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_checkpoint(out: Path, step: int, model: Model, state: dict[str, Any],
                    keep: int) -> Path:
    """Write `OUT/checkpoints/step-N` and delete all but the newest `keep` checkpoints."""
    target = save_model_dir(model, checkpoint_root(out) / f"step-{step}", {STATE_FILE: state})
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_state(folder: Path) -> dict[str, Any]:
    """The `training_state.pt` of a checkpoint, loaded weights-only on the CPU."""
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is an unusable checkpoint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BertrtError(f"{path}: cannot read the training state ({first})") from None


def remove_partial(out: Path) -> None:
    """Delete temporary folders that a killed run left behind."""
    for root in (checkpoint_root(out), Path(out)):
        if root.is_dir():
            for child in root.iterdir():
                if child.name.startswith(TMP_PREFIX) and child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, NumPy) as tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (renames into it) durable, where the system allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
