"""`bertrt serve` as a real process on 127.0.0.1: 429 past --max-concurrent at once,
SIGTERM answering every accepted request and exiting 0, and the one-line exits (code 2) of a
wrong model path and a port in use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import bertrt
from bertrt.serve.http.live import ServerProcess

REPO = Path(bertrt.__file__).resolve().parent.parent


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "bertrt", "serve", *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


class Process(ServerProcess):
    """A `bertrt serve` process on a free port (1 model thread); `url` once it listens."""

    def __init__(self, model: object, *args: object) -> None:
        super().__init__(str(model), [*map(str, args), "--threads", "1"], timeout=60)

    def in_flight(self) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        line = next(ln for ln in text.splitlines() if ln.startswith("bertrt_requests_in_flight"))
        return float(line.split()[1])

    def wait_in_flight(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight() < count:
            assert time.monotonic() < deadline, f"never {count} requests in flight"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start() -> Iterator[object]:
    started: list[Process] = []

    def make(*args: object) -> Process:
        started.append(Process(*args))
        return started[-1]

    yield make
    for process in started:
        process.kill()


def test_429_at_once_past_max_concurrent_and_sigterm_answers_every_accepted_request(
        encoder_dir, encoder, start, texts):
    """One server, --max-concurrent 6: six requests wait behind a 1 s timer; a seventh gets
    429 at once; SIGTERM then closes the door to new connections, answers all six, exits 0."""
    server = start(encoder_dir, "--max-concurrent", len(texts), "--max-wait-ms", 1000)
    with ThreadPoolExecutor(len(texts)) as pool:
        pending = [pool.submit(httpx.post, f"{server.url}/embed", json={"inputs": [t]},
                               timeout=30) for t in texts]
        server.wait_in_flight(len(texts))
        began = time.perf_counter()
        refused = httpx.post(f"{server.url}/embed", json={"inputs": ["dog"]}, timeout=30)
        refused_after = time.perf_counter() - began
        metrics = httpx.get(f"{server.url}/metrics").text
        server.proc.send_signal(signal.SIGTERM)
        closed = False
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline and not closed:
            try:  # a new connection: no longer accepted
                httpx.get(f"{server.url}/health", timeout=0.2)
            except httpx.TransportError:
                closed = True
            time.sleep(0.02)
        still_pending = sum(not f.done() for f in pending)
        answered = [f.result() for f in pending]
    assert refused.status_code == 429
    assert refused.json()["error_type"] == "overloaded"
    assert f"--max-concurrent {len(texts)}" in refused.json()["error"]
    assert refused_after < 0.5  # at once, not after the queue (its requests wait 1 s)
    assert 'bertrt_requests_total{route="/embed",status="429"} 1.0' in metrics
    assert server.proc.wait(timeout=30) == 0
    assert closed and still_pending > 0
    assert [r.status_code for r in answered] == [200] * len(texts)
    got = np.array([r.json()[0] for r in answered])
    np.testing.assert_allclose(got, encoder.embed(texts, normalize=True), atol=1e-6)
    assert any("stopped by SIGTERM" in line for line in server.stderr)


def _held_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_a_wrong_model_path_is_one_line_exit_2_before_any_socket(tmp_path):
    with _held_port() as held:  # a busy port: were it opened first, that would be the error
        port = held.getsockname()[1]
        result = subprocess.run(_command(tmp_path / "missing", "--port", port),
                                capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and "missing: no such file" in result.stderr
    assert "port" not in result.stderr


def test_a_port_in_use_is_one_line_exit_2_naming_it(encoder_dir):
    with _held_port() as held:
        port = held.getsockname()[1]
        result = subprocess.run(_command(encoder_dir, "--port", port, "--threads", 1),
                                capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and f"port {port} on 127.0.0.1 is in use" \
        in result.stderr
