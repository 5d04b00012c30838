"""Writing files whole or not at all: a temporary file in the same folder, fsync, rename.

Every file bertrt writes for a user goes through here, so an interrupted write never leaves a
half-written file where a good one stood. Files and folders get the mode a plain `open()` or
`mkdir` would give them (0666 / 0777 less the umask), not the private 0600 / 0700 of
`tempfile`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """The process umask (read without changing it where /proc tells it)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode `Path.mkdir()` gives a new folder: 0777 less the umask."""
    return 0o777 & ~umask()


def temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new uniquely named folder in `parent`, with the mode `mkdir` would give it (to be
    renamed into place once complete)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, dir_mode())
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it, give it the
    mode a plain `open()` would and rename it onto `path`; when it fails, remove it. For
    writers that want a path (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8, `\\n` newlines) to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
