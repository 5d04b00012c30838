"""`ServeOptions`: the server's address, limits and batcher knobs, checked in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bertrt.errors import BertrtError

#: The default batch duration target, ms. MiniLM-L6, real texts, 2 threads, AMD EPYC, the
#: highest Poisson rate within p99 <= 250 ms: packed fp32 best at a 256-token budget (~45 ms
#: a batch), int8 at 512 (~45 ms), OpenVINO bf16 at 512 of 512/1024/2048.
MAX_BATCH_MS = 40.0


@dataclass(frozen=True)
class ServeOptions:
    """How `bertrt serve` listens, batches and refuses.

    Attributes:
        host: Address to listen on (127.0.0.1: this machine only).
        port: TCP port (0: any free one, printed at start).
        max_batch_tokens: A batch's budget of positions: its real tokens when the engine
            packs, batch size x longest when it pads; an input over it runs alone. None: the
            engine's (the backend's `batch_tokens`: 512 on ONNX Runtime's CPU provider, 2048
            on OpenVINO).
        max_batch_ms: A batch's target duration in milliseconds: below `max_batch_tokens`,
            the budget is what the engine runs in that time at the speed of its recent
            batches, so a request's wait under load (the batch running when it comes, then
            its own) stays a few of these on any machine and precision. 0: no target, the
            budget is `max_batch_tokens`.
        max_batch_requests: At most this many inputs (sequences) per batch; None: no limit
            beyond the token budget.
        max_wait_ms: When the engine is free and the waiting inputs do not fill a batch, wait
            up to this long after the oldest arrived for more (0: run at once).
        max_concurrent: Requests in flight (accepted, not yet answered) beyond which a new one
            gets 429 at once.
        max_client_batch: Inputs one request may carry (more: 413).
        payload_limit: Bytes a request body may have (more: 413).
        auto_truncate: Truncate inputs over the model's maximum length instead of refusing
            them with 413 (a request's `truncate` field overrides it).
        pooling: The embedding routes' pooling (None: the model's sentence-transformers
            config, else cls).
        tokenization_workers: Threads that tokenize requests (and shape their results).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_tokens: int | None = None
    max_batch_requests: int | None = None
    max_batch_ms: float = MAX_BATCH_MS
    max_wait_ms: float = 0.0
    max_concurrent: int = 512
    max_client_batch: int = 32
    payload_limit: int = 2_000_000
    auto_truncate: bool = False
    pooling: str | None = None
    tokenization_workers: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise BertrtError(f"--port {self.port}: expected 0 to 65535")
        for name in ("max_batch_tokens", "max_batch_requests", "max_concurrent",
                     "max_client_batch", "payload_limit", "tokenization_workers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value
                                      or value < 1):
                raise BertrtError(f"--{name.replace('_', '-')}: expected a positive integer, "
                                  f"got {value!r}")
        if not self.max_batch_ms >= 0:
            raise BertrtError(f"--max-batch-ms: expected a number of at least 0, got "
                              f"{self.max_batch_ms!r}")
        if not self.max_wait_ms >= 0:
            raise BertrtError(f"--max-wait-ms: expected a number of at least 0, got "
                              f"{self.max_wait_ms!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
