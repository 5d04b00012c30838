"""The HTTP round trip a light-load request pays beside its model run: `bertrt serve` against
the bare stack it runs on, on the same machine in one run.

Each exchange goes over one kept-alive connection from serve-bench's load client
(`bertrt.serve.http.client`), one request at a time:

- `uvicorn, bare ASGI app`: a few lines of ASGI on uvicorn as `bertrt serve` runs it (uvloop,
  httptools, no access log) answer an /embed-shaped request: the JSON body read and parsed,
  a prepared 384-float vector written as JSON with `bertrt serve`'s eight timing headers;
- `uvicorn + Starlette`: the same through a Starlette route (its Request and Response;
  starlette comes with the `test` extra);
- `bertrt serve GET /health`: the server's own route with no body and no model;
- `bertrt serve POST /embed, outside the handler`: MiniLM's /embed on real text, its latency
  less the server's `x-total-time` (the handler, model run included): what the request
  pays in HTTP, routing and response writing.

Each at a light rate (Poisson gaps: the cores idle between requests, as at `bench_serve`'s
light load) and back to back, in `--slices` slices taken in turn. The gap between the two
columns is what the machine's idle cores cost a round trip; the gap between the bare app and
the rest is what the layers above uvicorn add.

    python tools/bench_http_floor.py [--rate 25] [--requests 300] [--slices 6] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

#: The timing headers `bertrt serve` writes (values as it formats them).
HEADERS = [(b"x-compute-type", b"ort"), (b"x-compute-tokens", b"12"),
           (b"x-compute-characters", b"53"), (b"x-tokenization-time", b"0.312"),
           (b"x-queue-time", b"0.000"), (b"x-inference-time", b"4.512"),
           (b"x-total-time", b"5.701"), (b"x-batches", b"1")]
#: The request the bare apps answer: a short text, as a light load sends.
BODY = b'{"inputs": "How do I export a fine-tuned model to ONNX?"}'


def bare_app(kind: str):
    """The ASGI app of `kind` ("asgi" or "starlette"), answering POST /embed."""
    import orjson

    vector = [np.random.default_rng(0).standard_normal(384).astype(np.float32)]

    def payload(body: bytes) -> bytes:
        orjson.loads(body)
        return orjson.dumps(vector, option=orjson.OPT_SERIALIZE_NUMPY)

    if kind == "starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        extra = {k.decode(): v.decode() for k, v in HEADERS}

        async def embed(request: Request) -> Response:
            return Response(payload(await request.body()), media_type="application/json",
                            headers=extra)

        return Starlette(routes=[Route("/embed", embed, methods=["POST"])])

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        content = payload(b"".join(chunks))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()), *HEADERS]})
        await send({"type": "http.response.body", "body": content})

    return app


def serve_bare(kind: str) -> None:
    """Run the bare app of `kind` on 127.0.0.1 (a free port, printed on stderr) until
    SIGTERM, configured as `bertrt serve` configures uvicorn."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(bare_app(kind), log_level="warning", access_log=False,
                            lifespan="on", timeout_keep_alive=5)
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr,
          flush=True)
    uvicorn.Server(config).run(sockets=[sock])


class Bare:
    """A bare app in a process of its own (this script with `--app`)."""

    def __init__(self, kind: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--app", kind],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "listening on " in line:
                self.url = line.rsplit("listening on ", 1)[1].strip()
                break
        else:
            raise RuntimeError(f"the bare {kind} app did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def exchange(url: str, requests: list[bytes], rate: float | None, seed: int,
             outside: bool) -> list[float]:
    """Milliseconds of each of `requests` on one connection, each after a Poisson gap at
    `rate` (None: back to back); with `outside`, each less the response's `x-total-time`.
    The first few warm the connection and are dropped."""
    from bertrt.serve.http.client import LoadClient, run_loop

    async def main() -> list[float]:
        rng = np.random.default_rng(seed)
        times = []
        async with LoadClient(url, connections=1) as client:
            for request in requests:
                if rate:
                    await asyncio.sleep(rng.exponential(1.0 / rate))
                stages: dict[str, float] = {}
                start = time.perf_counter()
                status = await client.send(request, stages if outside else None)
                if status != 200:
                    raise RuntimeError(f"{url}: status {status}")
                ms = (time.perf_counter() - start) * 1e3
                times.append(ms - stages["total"] if outside else ms)
        return times[3:]

    return run_loop(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=25.0,
                        help="Requests/s of the light load (Poisson gaps).")
    parser.add_argument("--requests", type=int, default=300,
                        help="Requests per exchange and column, over all slices.")
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--app", choices=["asgi", "starlette"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.app:
        serve_bare(args.app)
        return 0

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import orjson
    from bench_packed import real_texts
    from bench_serve import cpu_name
    from bench_torch import minilm_dir

    from bertrt.serve.http.client import LoadClient
    from bertrt.serve.http.live import ServerProcess

    per_slice = max(args.requests // args.slices, 4) + 3
    texts = real_texts(per_slice * args.slices)
    bares = [Bare("asgi"), Bare("starlette")]
    server = None
    try:
        server = ServerProcess(str(minilm_dir()), ["--threads", "2", "--auto-truncate"])
        prepare = LoadClient("http://127.0.0.1:1")  # request bytes only; never connects
        embed, health = prepare.post_bytes("/embed", BODY), prepare.get_bytes("/health")

        def real(chunk: list[str]) -> list[bytes]:
            return [prepare.post_bytes("/embed", orjson.dumps({"inputs": t})) for t in chunk]

        # (label, url, the requests of a slice's texts, less the server's total)
        rows = [("uvicorn, bare ASGI app: POST /embed", bares[0].url,
                 lambda chunk: [embed] * len(chunk), False),
                ("uvicorn + Starlette: POST /embed", bares[1].url,
                 lambda chunk: [embed] * len(chunk), False),
                ("bertrt serve: GET /health", server.url,
                 lambda chunk: [health] * len(chunk), False),
                ("bertrt serve: POST /embed (MiniLM), outside the handler", server.url, real,
                 True)]
        times: dict[tuple[int, bool], list[float]] = {}
        for piece in range(args.slices):
            chunk = texts[piece * per_slice:(piece + 1) * per_slice]
            sent = [requests(chunk) for _, _, requests, _ in rows]
            for light in (True, False):
                for i, (_, url, _, outside) in enumerate(rows):
                    times.setdefault((i, light), []).extend(exchange(
                        url, sent[i], args.rate if light else None, seed=piece,
                        outside=outside))
    finally:
        for bare in bares:
            bare.stop()
        if server is not None:
            server.stop()

    print(f"# HTTP round trip, p50 ms ({os.cpu_count()} cores, {cpu_name()}; {args.slices} slices, "
          f"{len(times[0, True])} requests per cell)")
    head = ("exchange", f"after Poisson gaps at {args.rate:g} req/s", "back to back")
    table = [(label, f"{np.median(times[i, True]):.3f}", f"{np.median(times[i, False]):.3f}")
             for i, (label, *_) in enumerate(rows)]
    if args.markdown:
        print(f"| {' | '.join(head)} |\n|---|---|---|")
        for row in table:
            print(f"| {' | '.join(row)} |")
    else:
        width = max(len(r[0]) for r in table)
        print(f"{head[0]:<{width}}  {head[1]:>30}  {head[2]:>12}")
        for label, light, hot in table:
            print(f"{label:<{width}}  {light:>30}  {hot:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
