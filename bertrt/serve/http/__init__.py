"""`bertrt serve`: an HTTP inference server in front of `InferenceEngine`.

Routes shaped like Hugging Face text-embeddings-inference's (`/embed`, `/predict`,
`/tokenize`, `/health`, `/info`, `/metrics`) and OpenAI's (`/v1/embeddings`), plus `/tag`;
a token-budget batcher that forms padding-free batches of already tokenized requests for one
engine thread; limits that refuse with 4xx/429 instead of queueing without bound; Prometheus
metrics and per-stage timing headers. `loadgen` drives a live server for
`bertrt serve-bench --url` (open loop and closed loop).

    >>> from bertrt.serve import InferenceEngine
    >>> from bertrt.serve.http import ServeOptions, create_app, serve
    >>> engine = InferenceEngine("model-dir", threads=2)
    >>> serve(engine, ServeOptions(port=8080, max_wait_ms=2))   # until SIGTERM
    >>> app = create_app(engine)                                # or any ASGI server

Needs the `serve` extra (uvicorn, httpx, orjson, prometheus-client).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public names, by the module that defines them (imported on first use, so `bertrt` runs
#: without the serve extra).
_EXPORTS = {"Server": "app", "create_app": "app", "Batcher": "batcher", "Job": "batcher",
            "batch_cut": "batcher", "ERROR_TYPES": "errors", "HttpError": "errors",
            "ServeOptions": "options", "bind": "server", "serve": "server"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
