"""The output folder, OUT: what a run writes there, and how `--overwrite` replaces an earlier
run so that OUT holds one complete run at every moment, the old one or the new one.

An `--overwrite` run of a used OUT builds the new run in a folder beside it (`staging_dir`, on
the same file system) and, once it is complete, exchanges the two folders (`replace_out`): one
`renameat2(RENAME_EXCHANGE)` on Linux, else two renames. The user's own files in OUT (anything
`is_run_output` does not claim) then move into the new OUT and the old run is deleted.
`recover_out`, called before every run reads OUT, finishes or undoes what a process stopped in
the middle of this left behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path

from bertrt.train import checkpoint as ckpt
from bertrt.train.report import LOSS_PNG, METRICS, RUN

DATA_DIR = "data"
#: The files `model.save(OUT)` writes into OUT.
MODEL_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json")
#: What a run writes into OUT.
RUN_OUTPUTS = frozenset({METRICS, RUN, LOSS_PNG, DATA_DIR, ckpt.CHECKPOINTS, ckpt.BEST,
                         *MODEL_FILES})
#: What `bertrt export OUT/NAME.onnx` writes there (a model, and its weights when over 2 GiB):
#: files of the model OUT held, which go with it.
EXPORT_SUFFIXES = (".onnx", ".onnx.data")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def is_run_output(name: str) -> bool:
    """Whether an entry of OUT is bertrt's: a run's output, an export of its model, or a
    temporary folder of a write that was cut short. Everything else is the user's."""
    return (name in RUN_OUTPUTS or name.endswith(EXPORT_SUFFIXES)
            or name.startswith(ckpt.TMP_PREFIX))


def staging_dir(out: Path) -> Path:
    """The folder beside OUT in which an `--overwrite` run builds its replacement."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.bertrt-new"


def _old_dir(out: Path) -> Path:
    """Where the old run waits between the two renames of an exchange without renameat2."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.bertrt-old"


def replace_out(new: Path, out: Path) -> None:
    """Make the complete run in `new` OUT: exchange the two folders, move the user's files of
    the old OUT into the new one, delete the old run (with any export of its model)."""
    _exchange(new, out)
    ckpt.fsync_dir(Path(out).absolute().parent)
    recover_out(out)


def recover_out(out: Path) -> None:
    """Tidy what an `--overwrite` stopped part-way left beside OUT: a half-built new run, or
    the old run an exchange put there, is deleted once the user's files in it are back in OUT;
    if OUT itself is missing (a stop between the two renames), the old run returns to it."""
    out, old = Path(out), _old_dir(out)
    if not out.exists() and old.is_dir():
        os.replace(old, out)
    for folder in (staging_dir(out), old):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not is_run_output(entry.name) and not (out / entry.name).exists():
                os.replace(entry, out / entry.name)
        shutil.rmtree(folder)


def _exchange(new: Path, out: Path) -> None:
    """Swap the folders `new` and `out`, in one step where the system can; otherwise the old
    run goes to `_old_dir(out)` and `new` to `out`."""
    if _rename_exchange(new, out):
        return
    old = _old_dir(out)
    os.replace(out, old)
    os.replace(new, out)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Linux's atomic exchange of two paths; False where the system or file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
