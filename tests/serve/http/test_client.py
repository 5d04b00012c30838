"""serve-bench's HTTP client against a hand-written server on 127.0.0.1 whose every byte the
test chooses: keep-alive reuse, bodies by length and chunked read to their end, `Connection:
close`, the connection cap, and each failure (timeout, refused, closed mid-response,
malformed) raised as its kind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from bertrt.errors import BertrtError
from bertrt.serve.http import bind
from bertrt.serve.http.client import LoadClient, RequestTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's head and body (by content-length), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def _ok(body: bytes = b'{"ok": true}', status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: "
            f"{len(body)}\r\n{extra}\r\n").encode() + body


async def _serve(handler: Handler) -> tuple[asyncio.Server, str, dict[str, int]]:
    """A server calling `handler(reader, writer, request)` per request until it returns
    False; counts the connections and requests it saw."""
    seen = {"connections": 0, "requests": 0, "open": 0, "most_open": 0}

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        seen["open"] += 1
        seen["most_open"] = max(seen["most_open"], seen["open"])
        try:
            while (request := await _read_request(reader)) is not None:
                seen["requests"] += 1
                if not await handler(reader, writer, request):
                    break
        finally:
            seen["open"] -= 1
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", seen


def _run(coro: Awaitable[object]) -> object:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_keep_alive_reuses_one_connection_and_returns_each_status():
    statuses = iter(["200 OK", "429 Too Many Requests", "200 OK", "404 Not Found"])

    async def handler(reader, writer, request) -> bool:
        assert request.startswith(b"POST /embed HTTP/1.1\r\n") and request.endswith(b'"x"}')
        writer.write(_ok(b"[1.0, 2.0]", next(statuses)))
        await writer.drain()
        return True

    async def main() -> tuple[list[int], dict[str, int], int]:
        server, url, seen = await _serve(handler)
        async with server, LoadClient(url) as client:
            request = client.post_bytes("/embed", b'{"inputs": "x"}')
            got = [await client.send(request) for _ in range(4)]
            return got, seen, client.opened

    got, seen, opened = _run(main())
    assert got == [200, 429, 200, 404]
    assert seen["connections"] == opened == 1 and seen["requests"] == 4


def test_the_servers_timing_headers_are_read_when_asked():
    timing = ("X-Queue-Time: 1.25\r\nx-inference-time: 6.5\r\nx-total-time: 8\r\n"
              "x-tokenization-time: soon\r\nx-other-time: 3\r\n")

    async def handler(reader, writer, request) -> bool:
        writer.write(_ok(extra=timing))
        await writer.drain()
        return True

    async def main() -> tuple[dict[str, float], dict[str, float]]:
        server, url, _ = await _serve(handler)
        async with server, LoadClient(url) as client:
            asked: dict[str, float] = {}
            await client.send(client.get_bytes("/"), asked)
            await client.send(client.get_bytes("/"))  # not asked: nothing to fill
            again: dict[str, float] = {}
            await client.send(client.get_bytes("/"), again)
            return asked, again

    asked, again = _run(main())
    # names in any case; a value that is not a number, and headers it does not know, skipped
    assert asked == again == {"queue": 1.25, "inference": 6.5, "total": 8.0}


def test_a_chunked_body_is_read_to_its_last_chunk():
    async def handler(reader, writer, request) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the status is known; the body is not done
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async def main() -> tuple[int, float, int]:
        server, url, seen = await _serve(handler)
        async with server, LoadClient(url) as client:
            start = time.perf_counter()
            status = await client.send(client.get_bytes("/health"))
            elapsed = time.perf_counter() - start
            await client.send(client.get_bytes("/health"))  # the connection is clean after
            return status, elapsed, seen["connections"]

    status, elapsed, connections = _run(main())
    assert status == 200 and elapsed >= 0.19 and connections == 1


def test_connection_close_opens_a_new_connection_next():
    async def handler(reader, writer, request) -> bool:
        writer.write(_ok(extra="connection: close\r\n"))
        await writer.drain()
        return False

    async def main() -> tuple[list[int], int, int]:
        server, url, seen = await _serve(handler)
        async with server, LoadClient(url) as client:
            got = [await client.send(client.get_bytes("/")) for _ in range(3)]
            return got, seen["connections"], client.opened

    got, connections, opened = _run(main())
    assert got == [200] * 3 and connections == opened == 3


def test_a_kept_alive_connection_the_server_closed_is_retried_once_on_a_new_one():
    async def handler(reader, writer, request) -> bool:
        if b"/second" in request and seen["connections"] == 1:
            return False  # close the first connection without a byte of an answer
        writer.write(_ok())
        await writer.drain()
        return True

    async def main() -> tuple[list[int], int]:
        nonlocal seen
        server, url, seen = await _serve(handler)
        async with server, LoadClient(url) as client:
            got = [await client.send(client.get_bytes(p)) for p in ("/first", "/second")]
            return got, client.opened

    seen: dict[str, int] = {}
    got, opened = _run(main())
    assert got == [200, 200] and opened == 2 and seen["requests"] == 3


def test_a_new_connection_closed_before_an_answer_is_not_retried():
    async def handler(reader, writer, request) -> bool:
        return False

    async def main() -> tuple[int, dict[str, int]]:
        server, url, seen = await _serve(handler)
        async with server, LoadClient(url) as client:
            with pytest.raises(ConnectionError):
                await client.send(client.get_bytes("/"))
            return client.opened, seen

    opened, seen = _run(main())
    assert opened == 1 and seen["requests"] == 1


def test_requests_past_the_connection_cap_wait_for_a_connection():
    async def handler(reader, writer, request) -> bool:
        await asyncio.sleep(0.05)
        writer.write(_ok())
        await writer.drain()
        return True

    async def main() -> tuple[list[int], dict[str, int]]:
        server, url, seen = await _serve(handler)
        async with server, LoadClient(url, connections=2) as client:
            request = client.get_bytes("/")
            got = await asyncio.gather(*(client.send(request) for _ in range(7)))
            return list(got), seen

    got, seen = _run(main())
    assert got == [200] * 7 and seen["requests"] == 7
    assert seen["most_open"] == seen["connections"] == 2


def test_a_response_too_slow_is_a_timeout_and_its_connection_is_dropped():
    async def handler(reader, writer, request) -> bool:
        if b"/slow" in request:
            await asyncio.sleep(1.0)
        writer.write(_ok())
        await writer.drain()
        return True

    async def main() -> tuple[float, int, int]:
        server, url, seen = await _serve(handler)
        async with server, LoadClient(url, timeout=0.2) as client:
            start = time.perf_counter()
            with pytest.raises(RequestTimeout, match="0.2 s"):
                await client.send(client.get_bytes("/slow"))
            elapsed = time.perf_counter() - start
            # the late answer must not be read as the next request's
            status = await client.send(client.get_bytes("/fast"))
            return elapsed, status, client.opened

    elapsed, status, opened = _run(main())
    assert 0.19 <= elapsed < 0.6 and status == 200 and opened == 2


@pytest.mark.parametrize("reply", [
    _ok(b"0123456789")[:-4],  # closed four bytes short of its content-length
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
    b"not http at all\r\n\r\n",
])
def test_a_cut_or_malformed_response_is_a_connection_error(reply):
    async def handler(reader, writer, request) -> bool:
        writer.write(reply)
        await writer.drain()
        return False  # and close

    async def main() -> None:
        server, url, _ = await _serve(handler)
        async with server, LoadClient(url) as client:
            with pytest.raises(ConnectionError):
                await client.send(client.get_bytes("/"))

    _run(main())


def test_nothing_listening_is_an_os_error():
    async def main(url: str) -> None:
        async with LoadClient(url) as client:
            with pytest.raises(OSError):
                await client.send(client.get_bytes("/"))

    with bind("127.0.0.1", 0) as sock:  # bound, not listening: connections are refused
        _run(main(f"http://127.0.0.1:{sock.getsockname()[1]}"))


@pytest.mark.parametrize("url", ["https://127.0.0.1:8080", "127.0.0.1:8080", "http://"])
def test_a_url_it_cannot_speak_to_is_one_line(url):
    with pytest.raises(BertrtError, match="expected http://host:port"):
        LoadClient(url)


def test_a_prepared_post_carries_its_length_and_type():
    client = LoadClient("http://127.0.0.1:9")
    raw = client.post_bytes("/embed", "{\"inputs\": \"caf\u00e9\"}".encode())
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n")[0] == b"POST /embed HTTP/1.1"
    # bytes, not characters: 18 characters, the last but two taking two bytes in UTF-8
    assert b"content-length: 19" in head and b"host: 127.0.0.1:9" in head
    assert body == "{\"inputs\": \"caf\u00e9\"}".encode()
