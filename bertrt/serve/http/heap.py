"""Keeping the garbage collector's full collections short in a process that serves or loads.

A server or a load generator holds a large heap made before its work starts: the model,
torch, onnxruntime and their modules (180,000 tracked objects for MiniLM). CPython's full
collection walks every tracked object while each thread that needs the interpreter waits.
Measured with MiniLM at 200 req/s: one took 104 ms in `bertrt serve` under load (13 ms with
the heap frozen), and the bench's process, which holds an engine too, spent ~90 ms on each
of its full collections, one of them inside a timed load. Inside `frozen_heap` what the
process held on entry is out of the collector's reach (`gc.freeze`): collections walk only
what the work made since, and still collect its cycles.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # blocks open: the heap is frozen while any is (nested or on other threads)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with the objects alive on entry frozen (`gc.freeze`), unfrozen when the
    last open block ends (a block inside another, or on another thread, keeps the outer's)."""
    global _depth
    with _lock:
        if not _depth:
            gc.collect()  # nothing that is already garbage is kept for the block's length
            gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if not _depth:
                gc.unfreeze()
