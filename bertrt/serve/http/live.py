"""`bertrt serve-bench` against a live server: the `--url` / `--rate` / `--concurrency` mode.

    bertrt serve-bench --url http://127.0.0.1:8080 --texts FILE --rate 5,10,20 [--duration S]
    bertrt serve-bench --url ... --texts FILE --concurrency 1,4,16
    bertrt serve-bench MODEL --texts FILE --rate 5,10,20 \\
        --server="--precision int8" --server="--padded"      # starts each server itself

Without `--url`, serve-bench starts `bertrt serve MODEL --port 0 ARGS` once per `--server`
(default: one with no extra arguments) on 127.0.0.1, all at once, then runs every load
against each in turn (interleaved: a drift of the machine hits every configuration alike),
and stops them with SIGTERM. `live_load` is the click hook that adds these options to
`serve-bench`.
"""

from __future__ import annotations

import functools
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from bertrt.errors import BertrtError, user_errors


class ServerProcess:
    """`bertrt serve MODEL --port 0 ARGS` on 127.0.0.1, ready once `url` is set.

    Raises:
        BertrtError: it exits, or does not listen within `timeout` seconds (its last line).
    """

    def __init__(self, model: str, args: Sequence[str], timeout: float = 300.0) -> None:
        import bertrt

        repo = str(Path(bertrt.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [repo, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.command = [sys.executable, "-m", "bertrt", "serve", model, "--host", "127.0.0.1",
                        "--port", "0", *args]
        self.proc = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True, env=env,
                                     stdout=subprocess.DEVNULL)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                last = self.stderr[-1].strip() if self.stderr else "no output"
                raise BertrtError(f"bertrt serve {shlex.join(args)}: did not start ({last})")
            if "listening on " in line:
                self.url = line.rsplit("listening on ", 1)[1].strip()
                return

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, and its exit code (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def run_configs(model: str, configs: Sequence[str], texts: Sequence[str], *,
                log: Callable[[str], None] | None = None, **load: Any) -> list[Any]:
    """Start one server per configuration (its `bertrt serve` arguments), run the loads
    interleaved (each load against every server, then the next load), stop them all."""
    from bertrt.serve.http.loadgen import LoadRun, run_load

    servers: list[ServerProcess] = []
    try:
        for args in configs:
            if log:
                log(f"starting bertrt serve {model} {args}".rstrip())
            servers.append(ServerProcess(model, shlex.split(args)))
        runs = [LoadRun(args or "default", s.url, "", {}) for args, s in zip(configs, servers)]
        loads = ([("rates", [r]) for r in load.pop("rates", ())]
                 + [("concurrency", [c]) for c in load.pop("concurrency", ())])
        for k, (kind, value) in enumerate(loads):
            for run, server in zip(runs, servers):
                one = run_load(server.url, texts, **{kind: value}, label=run.label,
                               log=log, **{**load, "seed": load.get("seed", 0) + k,
                                           "warmup": load.get("warmup", 8) if k == 0 else 0})
                run.route, run.info = one.route, one.info
                run.points.extend(one.points)
    finally:
        for server in servers:
            server.stop()
    return runs


def _floats(text: str | None, option: str, kind: type = float) -> list[Any]:
    if text is None:
        return []
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise BertrtError(f"{option}: expected comma-separated positive numbers, got {text!r}")
    return values


def live_load(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the live-server options to serve-bench; with `--url`, `--rate` or
    `--concurrency` the command runs a load instead of its offline benchmark."""
    names = ("url", "rates", "concurrency", "servers", "route", "timeout", "plot_path",
             "max_requests")

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        live = {name: kwargs.pop(name) for name in names}
        if live["url"] is None and live["rates"] is None and live["concurrency"] is None:
            if live["servers"] or live["plot_path"]:
                raise click.UsageError("--server and --plot go with --rate or --concurrency")
            if kwargs["model"] is None:
                raise click.UsageError("Missing argument 'MODEL' (or give --url)")
            return command(**kwargs)
        return _live(kwargs, **live)

    options = [
        click.option("--url", default=None, metavar="URL",
                     help="A live bertrt serve (e.g. http://127.0.0.1:8080) to load, instead "
                          "of benchmarking MODEL's backends offline."),
        click.option("--rate", "rates", default=None, metavar="R1,R2,...",
                     help="Open loop: Poisson arrivals at each rate (requests/s), --duration "
                          "seconds each [10]."),
        click.option("--concurrency", default=None, metavar="C1,C2,...",
                     help="Closed loop: C clients, each sending when answered."),
        click.option("--server", "servers", multiple=True, metavar="ARGS",
                     help="Without --url: start `bertrt serve MODEL ARGS` for this "
                          "configuration (repeat to compare; default: one, no ARGS)."),
        click.option("--route", default=None,
                     help="Route to load [by the model's head: /embed, /predict, /tag]."),
        click.option("--timeout", type=float, default=10.0, show_default=True,
                     help="Seconds a request may take before it counts as an error."),
        click.option("--max-requests", type=int, default=None,
                     help="At most N requests per load point [2 x rate x duration]."),
        click.option("--plot", "plot_path", default=None, metavar="PNG",
                     help="Write p50/p99 against offered rate (needs matplotlib)."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@user_errors
def _live(kwargs: dict[str, Any], *, url: str | None, rates: str | None,
          concurrency: str | None, servers: tuple[str, ...], route: str | None,
          timeout: float, plot_path: str | None, max_requests: int | None) -> None:
    from bertrt.fileio import atomic_write_text
    from bertrt.serve.http import loadgen
    from bertrt.serve.workload import read_texts

    try:
        import httptools  # noqa: F401  # the load client's parser
        import httpx  # noqa: F401
    except ImportError as exc:
        raise BertrtError(f"serve-bench against a live server needs {exc.name}: pip install "
                          "'bertrt[serve]'") from None
    model, texts_path = kwargs["model"], kwargs["texts_path"]
    if texts_path is None:
        raise BertrtError("--texts FILE is needed against a live server (one text per line)")
    if (url is None) == (model is None):
        raise BertrtError("give MODEL (serve-bench starts the servers) or --url (a running "
                          "one), not both")
    if url is not None and servers:
        raise BertrtError("--server starts servers of MODEL; with --url, the server runs "
                          "already")
    json_out = kwargs["json_out"]
    for path in (json_out, plot_path):
        if path not in (None, "-") and not Path(path).parent.is_dir():
            raise BertrtError(f"{path}: folder {Path(path).parent} does not exist")
    texts = read_texts(texts_path)

    def say(line: str) -> None:
        click.echo(line, err=True)

    load = dict(rates=_floats(rates, "--rate"), concurrency=_floats(concurrency,
                                                                     "--concurrency", int),
                duration=kwargs["duration"] or 10.0, timeout=timeout, route=route,
                max_requests=max_requests, seed=kwargs["seed"])
    if url is not None:
        runs = [loadgen.run_load(url, texts, label=url, log=say, **load)]
    else:
        threads = kwargs["threads"]
        configs = list(servers or [""])
        if threads is not None:
            configs = [c if "--threads" in c else f"{c} --threads {threads}".strip()
                       for c in configs]
        runs = run_configs(model, configs, texts, log=say, **load)
    table = loadgen.format_table(runs)
    click.echo(table, err=json_out == "-")
    report = loadgen.to_json(runs, texts=texts_path, duration=load["duration"])
    if json_out == "-":
        click.echo(report)
    elif json_out is not None:
        atomic_write_text(Path(json_out), report + "\n")
        say(f"wrote {json_out}")
    if plot_path is not None:
        if loadgen.plot(runs, plot_path, title=f"{Path(texts_path).name}"):
            say(f"wrote {plot_path}")
        else:
            say("warning: no plot: matplotlib is not installed (pip install 'bertrt[plot]')")
