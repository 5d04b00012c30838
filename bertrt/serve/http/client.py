"""serve-bench's HTTP client: keep-alive HTTP/1.1 connections on asyncio, requests written
from prepared bytes, responses read by httptools (the parser uvicorn serves with).

A load generator shares the machine with the server it measures, and its own cost per request
is part of every latency it records. A general client (aiohttp) spends ~0.6 ms of CPU per
request on this work here (URL and header objects, a response object, its reader); this one
spends ~0.2 ms, and its round trip to `GET /health` is ~0.5 ms shorter. It does only what a
load needs: one request at a time per connection (no pipelining: a request's latency is its
own), connections kept open and reused, the body of each response read to its end (length or
chunked) and dropped, its status returned, and the server's per-stage timing headers
(`x-queue-time`, ... as `bertrt serve` and text-embeddings-inference send them) read when asked.

    client = LoadClient("http://127.0.0.1:8080", connections=64, timeout=10)
    raw = client.post_bytes("/embed", b'{"inputs": "a dog"}')
    stages = {}
    status = await client.send(raw, stages)  # 200, stages {"queue": 0.1, "total": 6.9, ...}
    await client.close()                     # (ms); raises RequestTimeout / ConnectionError
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

from bertrt.errors import BertrtError

T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop where it is installed (uvicorn[standard] brings it): its timers
    and tasks cost a load's sender less CPU per arrival (0.37 against 0.44 ms a request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


#: The timing headers a response may carry (milliseconds), by the stage they name.
STAGE_HEADERS = {b"x-tokenization-time": "tokenize", b"x-queue-time": "queue",
                 b"x-inference-time": "inference", b"x-total-time": "total"}


class RequestTimeout(Exception):
    """No complete response within the client's timeout (the connection is closed)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a request written, its response parsed as it arrives."""

    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self._error = httptools.HttpParserError
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.reusable = True
        #: Whether any byte of the current request's response has arrived.
        self.responded = False
        #: Where the current response's timing headers go (None: not read).
        self.stages: dict[str, float] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except self._error as exc:
            self._fail(ConnectionError(f"a malformed response ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        self._fail(ConnectionError("the server closed the connection"))

    # httptools callbacks (the body is not kept)
    def on_message_begin(self) -> None:
        self.responded = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.stages is not None and (stage := STAGE_HEADERS.get(name.lower())):
            with contextlib.suppress(ValueError):  # not a number: not a timing it knows
                self.stages[stage] = float(value)

    def on_message_complete(self) -> None:
        self.reusable = self._parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._parser.get_status_code())

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class LoadClient:
    """Requests to one server over at most `connections` keep-alive connections at once.

    Args:
        url: The server, `http://host:port` (plain HTTP: a load runs next to its server).
        connections: Requests in flight at most; a request past it waits for a connection.
        timeout: Seconds from a request's send (connecting included) to its response's last
            byte; past it the request raises `RequestTimeout` and its connection is closed.

    Raises:
        BertrtError: the URL is not `http://host[:port]`.
    """

    def __init__(self, url: str, connections: int = 2048, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise BertrtError(f"{url}: expected http://host:port (serve-bench's load client "
                              "speaks plain HTTP/1.1)")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self._authority = f"{self.host}:{self.port}"
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(connections)
        self.opened = 0  # connections opened, for tests and reports

    def post_bytes(self, path: str, body: bytes,
                   content_type: str = "application/json") -> bytes:
        """A prepared `POST path` with `body`, sent as is by `send`."""
        return (f"POST {path} HTTP/1.1\r\nhost: {self._authority}\r\n"
                f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
                ).encode("latin-1") + body

    def get_bytes(self, path: str) -> bytes:
        """A prepared `GET path`."""
        return f"GET {path} HTTP/1.1\r\nhost: {self._authority}\r\n\r\n".encode("latin-1")

    async def send(self, request: bytes, stages: dict[str, float] | None = None) -> int:
        """Send a prepared request; its response's status once the whole body has arrived.
        With `stages`, the response's timing headers go there, milliseconds by stage
        (`STAGE_HEADERS`: tokenize, queue, inference, total), those it has.

        A kept-alive connection the server closed while it was idle (uvicorn closes them after
        5 s) fails before any byte of a response: the request is sent again once, on a new
        connection, as browsers and HTTP libraries do.

        Raises:
            RequestTimeout: no complete response within `timeout` (connecting included).
            OSError: refused, reset, or closed before the response ended (ConnectionError,
                socket.gaierror).
        """
        async with self._slots:
            try:
                async with asyncio.timeout(self.timeout):
                    connection, reused = await self._connection()
                    try:
                        return await self._exchange(connection, request, stages)
                    except ConnectionError:
                        if not reused or connection.responded:
                            raise
                    connection, _ = await self._connection()
                    return await self._exchange(connection, request, stages)
            except TimeoutError:
                raise RequestTimeout(f"no response within {self.timeout:g} s") from None

    async def _exchange(self, connection: _Connection, request: bytes,
                        stages: dict[str, float] | None) -> int:
        """One request and its response on `connection`, which goes back to the idle ones
        after it when both sides keep it alive."""
        assert connection.transport is not None
        waiter = asyncio.get_running_loop().create_future()
        connection.waiter = waiter
        connection.responded = False
        connection.stages = stages
        connection.transport.write(request)
        try:
            status = await waiter
        except BaseException:  # failed, timed out or cancelled: its state is unknown
            connection.close()
            raise
        if connection.reusable and connection.transport is not None:
            self._idle.append(connection)
        else:
            connection.close()
        return status

    async def _connection(self) -> tuple[_Connection, bool]:
        """An idle connection (and True), else a new one (and False)."""
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None and connection.reusable:
                return connection, True
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_Connection, self.host, self.port)
        self.opened += 1
        return connection, False

    async def close(self) -> None:
        """Close the idle connections (a request still in flight closes its own)."""
        for connection in self._idle:
            connection.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports close

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
