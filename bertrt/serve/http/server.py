"""Running the app: one process, one model, uvicorn on a socket bound here.

`bind` reserves the port before the model loads (a port in use is one line naming it: exit 2
from the CLI; `--port 0` takes any free port) without listening, so nothing connects until
the server runs. `serve(engine, options)` runs it; it prints
`listening on http://HOST:PORT` on stderr once the engine thread runs. SIGTERM (or Ctrl+C)
stops it gracefully: no new connections, every accepted request answered, the queue drained,
then a return (the CLI exits 0).
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from bertrt.errors import BertrtError
from bertrt.serve.engine import InferenceEngine
from bertrt.serve.http.app import create_app
from bertrt.serve.http.heap import frozen_heap
from bertrt.serve.http.options import ServeOptions


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not listening yet (connections are refused until the
    server starts: asyncio listens on it then).

    Raises:
        BertrtError: the port is in use, or the address cannot be bound (one line, naming it).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BertrtError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BertrtError(f"port {port} on {host} is in use (another server?); pick "
                              "another with --port") from None
        raise BertrtError(f"cannot bind {host}:{port} ({exc.strerror})") from None
    return sock


def _announce(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve(engine: InferenceEngine, options: ServeOptions | None = None, *,
          sock: socket.socket | None = None, log_level: str = "warning",
          announce: Callable[[str], None] = _announce) -> None:
    """Serve `engine` over HTTP until SIGTERM or SIGINT; returns once every accepted request
    is answered (the caller closes the engine).

    Args:
        engine: The engine.
        options: Address, limits, batcher knobs.
        sock: A socket `bind` gave (None: bind `options.host` and `options.port` now).
        log_level: uvicorn's and the server's log level.
        announce: Where the start and stop lines go (stderr).

    Raises:
        BertrtError: the port is in use or the address cannot be bound.
    """
    import uvicorn

    options = options or ServeOptions()
    if sock is None:
        sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    app = create_app(engine, options)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_keep_alive=5)
    logging.getLogger("bertrt.serve").setLevel(log_level.upper())

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                streams = (f"; {engine.streams} batches at once under load (--streams)"
                           if engine.streams > 1 else "")
                announce(f"bertrt serve: {engine.description}{streams}; listening on "
                         f"http://{host}:{port}")

    stopped: list[str] = []

    def note(signum: int, frame: FrameType | None) -> None:
        stopped.append(signal.Signals(signum).name)

    # uvicorn stops gracefully on these, then raises them again for the handlers it found:
    # these note the signal, so the process ends by returning, not by the signal
    previous: dict[int, Any] = {sig: signal.signal(sig, note)
                                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = Server(config)
        with frozen_heap():  # the engine, loaded by now, out of full collections' reach
            server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise BertrtError("the server did not start (see the log above)")
    if stopped:
        announce(f"bertrt serve: stopped by {stopped[0]} after answering every accepted "
                 "request")
