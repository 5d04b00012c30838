"""`bertrt serve-bench` and the `.onnx` half of `bertrt inspect`.

The main CLI (`bertrt/cli.py`) registers `serve_bench` with `main.add_command` and calls
`inspect_onnx(path)` for `.onnx` paths. User mistakes print one line, `error: ...`, and exit
with code 2, as everywhere in bertrt.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from bertrt.errors import BertrtError, user_errors

DEFAULT_SEQ_LENS = "32,128"
#: Untimed pause before each timed batch when several backends interleave (tools/bench_onnx.py
#: measured it: without it, one runtime's spinning threads slow the next one down).
INTERLEAVE_GAP_S = 0.01




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


def _backend_names(given: tuple[str, ...], model_is_dir: bool) -> list[str]:
    from bertrt.serve.backends import BACKENDS

    names: list[str] = []
    for item in given:
        for name in (part.strip() for part in item.split(",")):
            if not name:
                continue
            if name not in BACKENDS:
                raise BertrtError(f"--backend: {name!r} is unknown; expected one of "
                                  f"{', '.join(BACKENDS)}")
            if name not in names:
                names.append(name)
    if not names:
        names = ["ort", "torch"] if model_is_dir else ["ort"]
    return names


def _at_least(value: int | float | None, low: float, option: str) -> None:
    if value is not None and value < low:
        raise BertrtError(f"{option}: must be at least {low:g}, got {value}")


def _load_tokenizer(path: str, option: str) -> Any:
    from bertrt.tokenizer import Tokenizer

    p = Path(path)
    if not p.exists():
        raise BertrtError(f"{option} {p}: no such file or directory")
    return Tokenizer.from_dir(p) if p.is_dir() else Tokenizer.from_vocab(p)


def _vocab_tokens(tokenizer: Any) -> list[str]:
    vocab = tokenizer.vocab
    return sorted(vocab, key=vocab.__getitem__)


@click.command("serve-bench")
@click.argument("model")
@click.option("--backend", "backends", multiple=True, metavar="NAME",
              help="ort | ort-cuda | torch; repeat or comma-separate. Default: ort, plus torch "
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
                max_length: int | None, flavour: str, warmup: int, iters: int | None,
                duration: float | None, threads: int | None, seed: int, json_out: str | None,
                spin: bool | None, progress: bool | None) -> None:
    """Benchmark inference backends side by side on MODEL (an .onnx file or a model dir).

    Each shape (batch size x sequence length, or batch size x real texts) runs through every
    backend, interleaved; the report gives p50/p90/p99 latency per batch, sequences/s and
    tokens/s. For a model dir, a temporary ONNX file is exported for the ONNX backends.
    """
    from bertrt.fileio import atomic_write_text

    # ---- arguments (checked before anything slow)
    bsizes = _int_list(batch_sizes, "--batch-sizes")
    if texts_path is not None and seq_lens is not None:
        raise BertrtError("--seq-lens does not apply to --texts (each batch is padded to its "
                          "longest text); use --max-length to truncate")
    slens = _int_list(seq_lens or DEFAULT_SEQ_LENS, "--seq-lens")
    _at_least(warmup, 0, "--warmup")
    _at_least(iters, 1, "--iters")
    _at_least(threads, 1, "--threads")
    _at_least(max_length, 2, "--max-length")
    if duration is not None and not duration > 0:
        raise BertrtError(f"--duration: must be positive, got {duration}")
    if iters is not None and duration is not None:
        raise BertrtError("give --iters or --duration, not both")
    if flavour not in ("ort", "standard"):
        raise BertrtError(f"--flavour: {flavour!r} is unknown; expected ort or standard")
    if json_out not in (None, "-") and not Path(json_out).parent.is_dir():
        raise BertrtError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")
    threads = threads or os.cpu_count() or 1

    path = Path(model)
    if not path.exists():
        raise BertrtError(f"{path}: no such file or directory (expected an .onnx file or a "
                          "model dir)")
    is_dir = path.is_dir()
    names = _backend_names(backends, is_dir)
    from bertrt.serve.backends import ONNX_BACKENDS, import_onnxruntime

    if any(n in ONNX_BACKENDS for n in names):
        import_onnxruntime()  # a one-line error now rather than after loading the model

    # ---- the model, its tokenizer and its limits
    from bertrt.model import Model

    the_model: Model | None = None
    info = None
    tokenizer = None
    if is_dir:
        the_model = Model.load(path)
        tokenizer = the_model.tokenizer if the_model.has_tokenizer else None
        vocab_size = the_model.config.vocab_size
        max_positions: int | None = the_model.config.max_position_embeddings
        pad_id = the_model.config.pad_token_id
    else:
        from bertrt.onnx_info import describe

        info = describe(path)
        cfg = info.config or {}
        vocab_size = info.vocab_size or 0
        max_positions = cfg.get("max_position_embeddings")
        pad_id = int(cfg.get("pad_token_id", 0) or 0)
        if model_dir is not None:
            if "torch" in names:
                the_model = Model.load(model_dir)
                tokenizer = the_model.tokenizer if the_model.has_tokenizer else None
            else:
                tokenizer = _load_tokenizer(model_dir, "--model-dir")
        if vocab_path is not None:
            tokenizer = _load_tokenizer(vocab_path, "--vocab")
        if "torch" in names and the_model is None:
            raise BertrtError("backend torch needs the model's weights: give --model-dir DIR "
                              f"(the model dir {path.name} was exported from)")
    if tokenizer is not None and info is not None:
        _check_vocab(info, tokenizer, path)

    from bertrt.serve.workload import SyntheticWorkload, TextWorkload

    if texts_path is not None:
        if tokenizer is None and is_dir:
            raise BertrtError(f"--texts needs the tokenizer: {path} has neither vocab.txt nor "
                              "tokenizer.json")
        if tokenizer is None:
            raise BertrtError(f"--texts needs the tokenizer: {path} has none; give --vocab "
                              "vocab.txt or --model-dir DIR (the model dir it came from)")
        limit = min(x for x in (tokenizer.model_max_length, max_positions) if x)
        if max_length is not None and max_positions and max_length > max_positions:
            raise BertrtError(f"--max-length {max_length} exceeds the model's "
                              f"max_position_embeddings={max_positions}")
        workload: Any = TextWorkload.from_file(texts_path, tokenizer, bsizes,
                                               max_length or limit)
    else:
        if not vocab_size:
            raise BertrtError(f"{path}: cannot tell the vocabulary size (no config in its "
                              "metadata); give --model-dir DIR")
        if tokenizer is not None:
            vocab_size = min(vocab_size, tokenizer.vocab_size)
        if seq_lens is None and max_positions:
            # the default grid shrinks to what the model takes; lengths given are checked
            slens = sorted({min(s, int(max_positions)) for s in slens})
        workload = SyntheticWorkload(
            bsizes, slens, vocab_size,
            special_ids=sorted(tokenizer.special_ids) if tokenizer is not None else (pad_id,),
            cls_id=tokenizer.cls_id if tokenizer is not None else None,
            sep_id=tokenizer.sep_id if tokenizer is not None else None,
            max_positions=max_positions, seed=seed)

    # ---- backends, the run, the report
    from bertrt.serve.backends import BackendUnavailable, make_backend
    from bertrt.serve.report import run_benchmark

    to_stdout = json_out != "-"
    with contextlib.ExitStack() as stack:
        onnx_path: Path | None = None if is_dir else path
        if is_dir and any(n in ONNX_BACKENDS for n in names):
            assert the_model is not None
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bertrt-bench-")))
            click.echo(f"exporting {path} to a temporary {flavour}-flavour ONNX file ...",
                       err=True)
            onnx_path = the_model.export_onnx(tmp / "model.onnx", flavour=flavour)
        running, skipped = [], []
        for name in names:
            try:
                backend = make_backend(name, onnx_path=onnx_path, model=the_model,
                                       threads=threads,
                                       spinning=len(names) == 1 if spin is None else spin)
            except BackendUnavailable as exc:
                skipped.append(f"{name}: {exc}")
                continue
            stack.callback(backend.close)
            running.append(backend)
        if not running:
            raise BertrtError(f"no backend left to run ({'; '.join(skipped)})")
        for reason in skipped:
            click.echo(f"skipping backend {reason}", err=True)
        meta = {"model": str(path), "onnx_flavour": flavour if is_dir else
                (info.decoded.get("flavour") if info else None), "threads": threads}
        report = run_benchmark(
            workload, running, warmup=warmup,
            iters=iters if iters is not None or duration is not None else 20,
            duration=duration, pad_id=pad_id if tokenizer is None else tokenizer.pad_id,
            meta=meta, progress=progress, gap=INTERLEAVE_GAP_S if len(running) > 1 else 0.0)
    click.echo(report.format_header(), err=not to_stdout)
    click.echo(report.format_table(), err=not to_stdout)
    if json_out == "-":
        click.echo(report.to_json())
    elif json_out is not None:
        atomic_write_text(Path(json_out), report.to_json() + "\n")
        click.echo(f"wrote {json_out}", err=True)


def _check_vocab(info: Any, tokenizer: Any, path: Path) -> None:
    """Warn when the tokenizer's vocab is not the one the ONNX model was exported with."""
    expected = info.metadata.get("vocab_sha256")
    if not expected:
        return
    from bertrt.lower.to_onnx import vocab_checksum

    if vocab_checksum(_vocab_tokens(tokenizer))["vocab_sha256"] != expected:
        click.echo(f"warning: the vocabulary given differs from the one {path.name} was "
                   "exported with (sha256 mismatch)", err=True)
