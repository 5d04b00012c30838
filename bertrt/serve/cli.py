"""`bertrt serve-bench` and the `.onnx` half of `bertrt inspect`.

The main CLI (`bertrt/cli.py`) registers `serve_bench` with `main.add_command` and calls
`inspect_onnx(path)` for `.onnx` paths. User mistakes print one line, `error: ...`, and exit
with code 2, as everywhere in bertrt.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from bertrt.errors import BertrtError, user_errors
from bertrt.serve.http.live import live_load


def inspect_onnx(path: str | os.PathLike[str]) -> str:
    """What `bertrt inspect model.onnx` prints: file size and parameters, opsets, metadata
    (config summary, head, flavour, vocab checksum, id2label, fusion counts), inputs and outputs
    with their dims, fused ops, and op counts by `domain::op`.

    Raises:
        BertrtError: the file is missing, truncated, corrupt or fails the ONNX checker.
    """
    from bertrt.onnx_info import describe, format_info

    return format_info(describe(path))


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise BertrtError(f"{option}: expected comma-separated positive integers, got {text!r}")
    return values


@click.command("serve-bench")
@click.argument("model", required=False)
@live_load
@click.option("--backend", "backends", multiple=True, metavar="NAME",
              help="ort | ort-cuda | openvino | torch, each optionally with :packed or "
                   ":padded and :int8 | :bf16 | :fp16 (e.g. ort:packed:int8, "
                   "openvino:packed:bf16); repeat or comma-separate. Default: ort, plus torch "
                   "when MODEL is a model dir.")
@click.option("--batch-sizes", default="1,8,32", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--seq-lens", default=None,
              help="Comma-separated sequence lengths of the synthetic workload [32,128].")
@click.option("--texts", "texts_path", metavar="FILE",
              help="Real texts, one per line (UTF-8), instead of synthetic ids.")
@click.option("--vocab", "vocab_path", metavar="PATH",
              help="vocab.txt (or a model dir) to tokenize --texts for a bare .onnx MODEL.")
@click.option("--model-dir", metavar="DIR",
              help="The model dir an .onnx MODEL came from: its tokenizer, and its weights for "
                   "--backend torch.")
@click.option("--max-length", type=int, default=None,
              help="Truncate texts to this many tokens [model's maximum].")
@click.option("--order", default="arrival", show_default=True,
              help="--texts batches: arrival (as the texts come: live traffic), sorted (the "
                   "whole file sorted by length: offline), or arrival,sorted for both.")
@click.option("--flavour", default="ort", show_default=True,
              help="ONNX flavour exported for a model dir: ort | standard.")
@click.option("--warmup", type=int, default=3, show_default=True,
              help="Untimed batches per shape.")
@click.option("--iters", type=int, default=None, help="Timed batches per shape [20].")
@click.option("--duration", type=float, default=None,
              help="Time each shape for about S seconds instead of --iters.")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads of every backend [all cores].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the synthetic token ids.")
@click.option("--json", "json_out", metavar="OUT", default=None,
              help="Write the report as JSON to OUT ('-': stdout; the table goes to stderr).")
@click.option("--spin/--no-spin", default=None,
              help="Let idle ONNX Runtime threads spin [only when one backend runs: spinning "
                   "pools steal the cores of the other backends].")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr [when stderr is a terminal].")
@user_errors
def serve_bench(model: str, backends: tuple[str, ...], batch_sizes: str, seq_lens: str | None,
                texts_path: str | None, vocab_path: str | None, model_dir: str | None,
                max_length: int | None, order: str, flavour: str, warmup: int, iters: int | None,
                duration: float | None, threads: int | None, seed: int, json_out: str | None,
                spin: bool | None, progress: bool | None) -> None:
    """Benchmark inference backends side by side on MODEL (an .onnx file or a model dir).

    Each shape (batch size x sequence length, or batch size x real texts) runs through every
    backend, interleaved; the report gives p50/p90/p99 latency per batch, sequences/s and
    tokens/s. For a model dir, a temporary ONNX file is exported for the ONNX backends. The
    backends' outputs are cross-checked on the first batch: when they disagree beyond the
    bound, nothing is timed (exit code 2). The Python API: `bertrt.serve.benchmark_model`.
    With --url, --rate or --concurrency: a load against a live `bertrt serve` instead
    (`bertrt.serve.http.live`; docs/serving.md).
    """
    from bertrt.fileio import atomic_write_text
    from bertrt.serve.bench import BenchOptions, benchmark_model

    options = BenchOptions(
        backends=backends or None, batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
        seq_lens=None if seq_lens is None else _int_list(seq_lens, "--seq-lens"),
        texts=texts_path, vocab=vocab_path, model_dir=model_dir, max_length=max_length,
        orders=[part.strip() for part in order.split(",") if part.strip()],
        flavour=flavour, warmup=warmup, iters=iters, duration=duration, threads=threads,
        seed=seed, spin=spin, progress=progress)
    options.validate()
    if json_out not in (None, "-") and not Path(json_out).parent.is_dir():
        raise BertrtError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")
    report = benchmark_model(model, options, log=lambda line: click.echo(line, err=True))
    to_stdout = json_out != "-"
    click.echo(report.format_header(), err=not to_stdout)
    click.echo(report.format_table(), err=not to_stdout)
    if json_out == "-":
        click.echo(report.to_json())
    elif json_out is not None:
        atomic_write_text(Path(json_out), report.to_json() + "\n")
        click.echo(f"wrote {json_out}", err=True)
