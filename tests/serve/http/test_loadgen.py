"""serve-bench against a live server: open-loop Poisson and closed-loop loads, bounded, with
their errors counted; the command's table, JSON and its one-line mistakes. The server runs
in this process (uvicorn on a thread, 127.0.0.1); one test starts `bertrt serve` itself."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from bertrt.cli import main
from bertrt.serve.http import ServeOptions, bind, create_app
from bertrt.serve.http.loadgen import format_table, run_load


@pytest.fixture
def live(encoder) -> Iterator[object]:
    """`live(**options)`: the URL of a server of the tiny encoder on a thread."""
    import uvicorn

    started = []

    def start(**options: object) -> str:
        sock = bind("127.0.0.1", 0)
        app = create_app(encoder, ServeOptions(**options))
        server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((server, thread, sock))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread, sock in started:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_open_loop_sends_poisson_arrivals_for_the_duration_and_stops(live, texts):
    url = live()
    began = time.perf_counter()
    run = run_load(url, texts, rates=[40], duration=1.5, timeout=5, warmup=2)
    elapsed = time.perf_counter() - began
    [point] = run.points
    assert run.route == "/embed" and run.info["head"] == "none"
    assert 30 <= point.sent <= 95  # Poisson(60): far outside this, the rate is wrong
    assert point.ok == point.sent and point.errors == {}
    assert point.mode == "open" and point.load == 40
    assert 1.3 < point.seconds < 1.6 and elapsed < 1.5 + 5 + 3
    assert point.throughput == pytest.approx(point.ok / point.seconds)
    p50, p90, p99 = (point.percentile_ms(q) for q in (50, 90, 99))
    assert 0 < p50 <= p90 <= p99 < 5000
    # every answer's timing headers, in milliseconds: the server's total within the latency
    # the client saw, the batch's run within the total
    stages = point.stages
    assert set(stages) == {"tokenize", "queue", "inference", "total", "outside"}
    assert all(len(values) == point.ok for values in stages.values())
    latencies_ms = [x * 1e3 for x in point.latencies]
    for total, inference, queue, latency in zip(stages["total"], stages["inference"],
                                                stages["queue"], latencies_ms):
        assert 0 < inference <= total <= latency and 0 <= queue <= total
    assert 0 < point.stage_ms("outside") < p50


def test_max_requests_bounds_an_open_loop(live, texts):
    url = live()
    [point] = run_load(url, texts, rates=[500], duration=5, max_requests=20, warmup=0).points
    assert point.sent == 20 and point.seconds < 2


def test_closed_loop_keeps_its_clients_busy_and_counts_429s(live, texts):
    url = live()
    [point] = run_load(url, texts, concurrency=[3], duration=1.0, warmup=0).points
    assert point.mode == "closed" and point.ok == point.sent > 3 and point.errors == {}
    busy = live(max_concurrent=1, max_wait_ms=100)
    [crowded] = run_load(busy, texts, concurrency=[4], duration=1.0, warmup=0).points
    assert crowded.errors.get("429", 0) > 0 and crowded.ok > 0
    assert crowded.ok + crowded.errors["429"] == crowded.sent
    assert "429: " in format_table([run_load(busy, texts, concurrency=[4], duration=0.5,
                                             warmup=0)])


def test_the_command_prints_a_table_and_writes_json(live, tmp_path, texts):
    url = live()
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(t for t in texts if t.strip()) + "\n")
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    result = CliRunner().invoke(main, ["serve-bench", "--url", url, "--texts", str(texts_file),
                                       "--rate", "20,40", "--concurrency", "2",
                                       "--duration", "0.5", "--json", str(out),
                                       "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "| config | loop | offered |" in result.output
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the plot extra is not installed: said, and nothing written
        assert "no plot: matplotlib is not installed" in result.output
        assert not png.exists()
    report = json.loads(out.read_text())
    points = report["runs"][0]["points"]
    assert [(p["mode"], p["load"]) for p in points] == [("open", 20), ("open", 40),
                                                         ("closed", 2)]
    for p in points:
        assert p["ok"] == p["sent"] > 0 and p["errors"] == {}
        assert p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"]
        assert set(p) >= {"throughput", "sent_per_s", "seconds", "mean_ms"}
        assert 0 < p["stages_p50_ms"]["inference"] <= p["stages_p50_ms"]["total"]
    assert "p50 by stage ms |" in result.output and "outside " in result.output


@pytest.mark.parametrize("args, words", [
    (["--rate", "5"], "--texts FILE"),
    (["--rate", "5", "--texts", "{texts}", "MODEL"], "not both"),
    (["--rate", "0", "--texts", "{texts}"], "positive"),
    (["--rate", "fast", "--texts", "{texts}"], "--rate"),
])
def test_the_commands_mistakes_are_one_line(live, tmp_path, args, words):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("a dog\n")
    args = [a.replace("{texts}", str(texts_file)) for a in args]
    if "MODEL" in args:
        args[args.index("MODEL")] = str(tmp_path)
    result = CliRunner().invoke(main, ["serve-bench", "--url", live(), *args])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and words in result.output


def test_nothing_listening_is_one_line(tmp_path):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("a dog\n")
    with bind("127.0.0.1", 0) as sock:  # bound, not listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = CliRunner().invoke(main, ["serve-bench", "--url", url, "--texts",
                                           str(texts_file), "--rate", "5"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "no server answers" in result.output


def test_serve_bench_starts_each_configuration_itself(encoder_dir, tmp_path, texts):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(t for t in texts if t.strip()) + "\n")
    out = tmp_path / "load.json"
    result = CliRunner().invoke(main, ["serve-bench", str(encoder_dir), "--texts",
                                       str(texts_file), "--concurrency", "2", "--duration",
                                       "0.5", "--server", "--padded --max-wait-ms 1",
                                       "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    [run] = json.loads(out.read_text())["runs"]
    assert run["label"] == "--padded --max-wait-ms 1 --threads 1"
    assert run["info"]["packed"] is False and run["info"]["max_wait_ms"] == 1.0
    assert run["info"]["threads"] == 1
    assert run["points"][0]["ok"] > 0


def test_a_load_and_a_server_run_with_the_heap_they_started_with_frozen(live, texts, encoder,
                                                                        monkeypatch):
    """Full collections skip what the process held when the load (or the server) started:
    `gc.freeze` for the run, `gc.unfreeze` after the last open block; a cycle made meanwhile
    is still collected."""
    import gc
    import weakref

    import uvicorn

    from bertrt.serve.http import loadgen, serve
    from bertrt.serve.http.heap import frozen_heap

    class Node:
        pass

    frozen = []
    with frozen_heap():
        frozen.append(gc.get_freeze_count())
        with frozen_heap():  # a block inside another keeps the outer's frozen heap
            pass
        assert gc.get_freeze_count() == frozen[0]
        cycle = Node()
        cycle.self = cycle
        alive = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert alive() is None
    assert frozen[0] > 1000 and gc.get_freeze_count() == 0

    real_loop = loadgen.run_loop

    def counting_loop(coro):
        frozen.append(gc.get_freeze_count())
        return real_loop(coro)

    monkeypatch.setattr(loadgen, "run_loop", counting_loop)
    run_load(live(), texts, rates=[20], duration=0.3, warmup=0)
    assert frozen[1] > 1000 and gc.get_freeze_count() == 0

    def counting_run(self, sockets=None):
        frozen.append(gc.get_freeze_count())
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", counting_run)
    serve(encoder, ServeOptions(), sock=bind("127.0.0.1", 0), announce=lambda line: None)
    assert frozen[2] > 1000 and gc.get_freeze_count() == 0
