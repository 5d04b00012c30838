"""Keeping the garbage collector's full collections short in a process that serves or loads.

A server or load generator holds a large heap made before its work starts: the model, torch,
onnxruntime and their modules (about a million objects with torch). CPython's full collection
walks every tracked object, so each one stalls the process's threads that need the GIL:
measured on MiniLM at 200 req/s, 75 ms in `bertrt serve` (the event loop and every request in
flight wait) and up to 96 ms in serve-bench's load client (every latency it times then
includes the pause), which collected 21 times in 20 s. Inside `frozen_heap`, what the process
held on entry is out of the collector's reach (`gc.freeze`): collections walk only what the
work made since, as they should; cycles made meanwhile are still collected.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with the objects alive on entry frozen (`gc.freeze`), unfrozen after."""
    gc.collect()  # nothing that is already garbage is kept for the block's length
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
