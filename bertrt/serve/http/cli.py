"""`bertrt serve`: the click layer over `bertrt.serve.http.serve`.

The main CLI (`bertrt/cli.py`) registers `serve` with `main.add_command`. A user mistake (a
wrong model path, a port in use, a bad option) prints one line and exits 2: a missing model
before any socket is opened, a port in use before the model loads.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from bertrt.errors import BertrtError, user_errors
from bertrt.serve.engine import ENGINE_BACKENDS, PRECISIONS
from bertrt.serve.http.options import MAX_BATCH_MS
from bertrt.serve.outputs import POOLINGS


def _missing_extra() -> BertrtError:
    return BertrtError("bertrt serve needs the serve extra: pip install 'bertrt[serve]' "
                       "(uvicorn, httpx, orjson, prometheus-client)")


@click.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: any free one, printed at start).")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(ENGINE_BACKENDS), help="The engine's backend.")
@click.option("--precision", default="fp32", show_default=True,
              type=click.Choice(PRECISIONS), help="The engine's precision.")
@click.option("--packed/--padded", default=None,
              help="Padding-free batches, or each padded to its longest [the engine's "
                   "default for the backend; an .onnx MODEL: as exported].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="The model's intra-op threads [the runtime's default: all cores].")
@click.option("--vocab", metavar="PATH",
              help="For an .onnx MODEL: vocab.txt, or the model dir it was exported from.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Longest input in tokens, specials included [the model's].")
@click.option("--pooling", type=click.Choice(POOLINGS), default=None,
              help="Pooling of the embedding routes [the sentence-transformers config, "
                   "else cls].")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=None,
              help="A batch's budget: its real tokens when packed, size x longest when "
                   "padded [the backend's: 512 on ONNX Runtime's CPU provider, 2048 on "
                   "OpenVINO].")
@click.option("--max-batch-ms", type=click.FloatRange(min=0), default=MAX_BATCH_MS,
              show_default=True,
              help="A batch's target duration: the budget shrinks to what the engine runs in X "
                   "ms at its recent speed (0: always the full --max-batch-tokens).")
@click.option("--streams", type=click.IntRange(min=1), default=None,
              help="Batches run at once under load, one per core, on a single-thread session "
                   "(packed, ONNX Runtime's CPU provider or OpenVINO; a lone request still "
                   "runs on every thread) [--threads, or the cores; 1: one batch at a time].")
@click.option("--max-batch-requests", type=click.IntRange(min=1), default=None,
              help="At most N inputs per batch [no limit but the budget].")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Wait up to X ms for more inputs when the waiting ones do not fill a batch.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=512, show_default=True,
              help="Requests in flight beyond which new ones get 429.")
@click.option("--max-client-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Inputs one request may carry (more: 413).")
@click.option("--payload-limit", type=click.IntRange(min=1), default=2_000_000,
              show_default=True, metavar="BYTES", help="Largest request body (more: 413).")
@click.option("--auto-truncate", is_flag=True,
              help="Truncate inputs over the maximum length instead of answering 413.")
@click.option("--tokenization-workers", type=click.IntRange(min=1), default=2,
              show_default=True, help="Threads that tokenize requests.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@user_errors
def serve(model: str, host: str, port: int, backend: str, precision: str,
          packed: bool | None, threads: int | None, vocab: str | None, max_length: int | None,
          pooling: str | None, max_batch_tokens: int | None, max_batch_ms: float,
          streams: int | None, max_batch_requests: int | None,
          max_wait_ms: float, max_concurrent: int, max_client_batch: int, payload_limit: int,
          auto_truncate: bool, tokenization_workers: int, log_level: str) -> None:
    """Serve MODEL (a model dir or an .onnx file) over HTTP until SIGTERM.

    Routes by the model's head: POST /embed, /v1/embeddings (any head), /predict (a sequence
    classifier), /tag (a token classifier), /tokenize; GET /health, /info, /metrics. Requests
    are tokenized as they come, queued, and batched by a budget of real tokens for one engine
    thread. SIGTERM stops accepting, answers every accepted request, and exits 0.
    """
    try:
        import orjson  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise _missing_extra() from None
    from bertrt.serve.engine import InferenceEngine
    from bertrt.serve.http.options import ServeOptions
    from bertrt.serve.http.server import bind
    from bertrt.serve.http.server import serve as run_server

    if not Path(model).exists():  # before any socket, and without loading torch
        raise BertrtError(f"{model}: no such file or directory (expected a model dir or an "
                          ".onnx file)")

    options = ServeOptions(host=host, port=port, max_batch_tokens=max_batch_tokens,
                           max_batch_requests=max_batch_requests, max_batch_ms=max_batch_ms,
                           max_wait_ms=max_wait_ms,
                           max_concurrent=max_concurrent, max_client_batch=max_client_batch,
                           payload_limit=payload_limit, auto_truncate=auto_truncate,
                           pooling=pooling, tokenization_workers=tokenization_workers)
    sock = bind(host, port)  # the port is reserved (or refused) before the model loads
    try:
        with InferenceEngine(model, backend=backend, precision=precision, packed=packed,
                             threads=threads, max_batch_tokens=max_batch_tokens, vocab=vocab,
                             max_length=max_length, yield_cores=True,
                             streams=streams or threads or os.cpu_count() or 1) as engine:
            run_server(engine, options, sock=sock, log_level=log_level)
    finally:
        sock.close()
