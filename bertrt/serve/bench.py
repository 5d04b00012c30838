"""serve-bench from Python: a model path and options in, a `Report` out.

`bertrt serve-bench` is a thin click layer over this module; everything it decides (which
backends, which tokenizer and vocabulary, which workload, the model's limits) is decided here:

    >>> from bertrt.serve import BenchOptions, benchmark_model
    >>> report = benchmark_model("model-dir", BenchOptions(batch_sizes=[1, 32], seq_lens=[128]))
    >>> print(report.format_table())

or step by step:

    >>> options = BenchOptions(model_dir="model-dir", backends=["ort", "torch"])
    >>> target = resolve_target("model.onnx", options)
    >>> target.tokenizer, target.workload.shapes()
    >>> with contextlib.ExitStack() as stack:
    ...     backends = target.open_backends(stack, options)
    ...     report = run_benchmark(target.workload, backends, pad_id=target.pad_id)

`MODEL` is a model dir (its weights, tokenizer and config; the ONNX backends get a temporary
export) or an `.onnx` file (its limits and vocabulary from the metadata bertrt's exporter
writes; the tokenizer from `vocab` or `model_dir`, the torch backend's weights from
`model_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertrt.errors import BertrtError
from bertrt.serve.backends import (
    FLAVOURS,
    ONNX_BACKENDS,
    Backend,
    BackendUnavailable,
    Variant,
    import_onnxruntime,
    make_backend,
)
from bertrt.serve.report import Report, run_benchmark
from bertrt.serve.workload import SyntheticWorkload, TextWorkload, Workload

if TYPE_CHECKING:
    from bertrt.model import Model
    from bertrt.onnx_info import OnnxInfo
    from bertrt.tokenizer import Tokenizer

#: Sequence lengths of the synthetic workload when none are given (capped at the model's).
DEFAULT_SEQ_LENS = (32, 128)
#: Timed batches per shape when neither `iters` nor `duration` is given.
DEFAULT_ITERS = 20
#: Untimed pause before each timed batch when several backends interleave (tools/bench_onnx.py
#: measured it: without it, one runtime's spinning threads slow the next one down).
INTERLEAVE_GAP_S = 0.01

Log = Callable[[str], None]
PathLike = str | os.PathLike[str]


@dataclass
class BenchOptions:
    """What to benchmark and how: the options of `bertrt serve-bench`, one field each.

    Errors name the command-line option (`--iters`, ...) of the field they are about.
    """

    #: Backends, each a name (`BACKENDS`) or a variant (`ort:packed:int8`, `openvino:bf16`:
    #: see `Variant`); comma-separated items are split. None: `ort`, plus `torch` when the
    #: model is a model dir.
    backends: Sequence[str] | None = None
    batch_sizes: Sequence[int] = (1, 8, 32)
    #: Synthetic sequence lengths. None: `DEFAULT_SEQ_LENS`, capped at the model's maximum.
    seq_lens: Sequence[int] | None = None
    #: A UTF-8 file of real texts, one per line, instead of synthetic ids.
    texts: PathLike | None = None
    #: vocab.txt (or a model dir) to tokenize `texts` for a bare `.onnx` model.
    vocab: PathLike | None = None
    #: The model dir an `.onnx` model came from: its tokenizer, and weights for `torch`.
    model_dir: PathLike | None = None
    #: Truncate texts to this many tokens (None: the model's maximum).
    max_length: int | None = None
    #: For `texts`: "arrival" (batches as the texts come) and/or "sorted" (by length).
    orders: Sequence[str] = ("arrival",)
    #: ONNX flavour exported for a model dir: `ort` or `standard`.
    flavour: str = "ort"
    warmup: int = 3
    #: Timed batches per shape (None: `DEFAULT_ITERS`, unless `duration` is given).
    iters: int | None = None
    #: Time each shape for about this many seconds instead of `iters`.
    duration: float | None = None
    #: Intra-op threads of every backend (None: all cores).
    threads: int | None = None
    seed: int = 0
    #: Let idle ONNX Runtime threads spin (None: only when one backend runs).
    spin: bool | None = None
    #: Progress bar on stderr (None: when stderr is a terminal).
    progress: bool | None = None

    def validate(self) -> None:
        """Check the options that need no model.

        Raises:
            BertrtError: one line naming the option.
        """
        if self.texts is not None and self.seq_lens is not None:
            raise BertrtError("--seq-lens does not apply to --texts (each batch is padded to "
                              "its longest text); use --max-length to truncate")
        for value, low, option in ((self.warmup, 0, "--warmup"), (self.iters, 1, "--iters"),
                                   (self.threads, 1, "--threads"),
                                   (self.max_length, 2, "--max-length")):
            if value is not None and value < low:
                raise BertrtError(f"{option}: must be at least {low:g}, got {value}")
        if self.duration is not None and not self.duration > 0:
            raise BertrtError(f"--duration: must be positive, got {self.duration}")
        if self.iters is not None and self.duration is not None:
            raise BertrtError("give --iters or --duration, not both")
        if self.flavour not in ("ort", "standard"):
            raise BertrtError(f"--flavour: {self.flavour!r} is unknown; expected ort or "
                              "standard")

    @property
    def thread_count(self) -> int:
        """`threads`, or every core."""
        return self.threads or os.cpu_count() or 1


def backend_names(given: Sequence[str] | None, model_is_dir: bool) -> list[str]:
    """The backends (or variants) to run, in order, each once (comma-separated items split),
    in their canonical spelling (`Variant.label`).

    Raises:
        BertrtError: an unknown name or modifier.
    """
    names: list[str] = []
    for item in given or ():
        for spec in (part.strip() for part in item.split(",")):
            if not spec:
                continue
            label = Variant.parse(spec).label
            if label not in names:
                names.append(label)
    return names or (["ort", "torch"] if model_is_dir else ["ort"])


@dataclass
class BenchTarget:
    """A model path resolved for serve-bench: what runs it, what feeds it."""

    path: Path
    #: The backends to run (names or variants, `Variant.label`), reference first.
    backends: list[str]
    workload: Workload
    #: The weights: the model dir's, or `model_dir`'s beside an `.onnx` file when `torch` runs.
    model: Model | None = None
    #: What the `.onnx` file holds (None for a model dir).
    onnx_info: OnnxInfo | None = None
    tokenizer: Tokenizer | None = None
    #: The id the batcher pads with: the tokenizer's `[PAD]`, else the config's.
    pad_id: int = 0

    @property
    def is_dir(self) -> bool:
        return self.onnx_info is None

    def open_backends(self, stack: contextlib.ExitStack, options: BenchOptions,
                      log: Log | None = None) -> list[Backend]:
        """Start the backends (for a model dir, first export the temporary ONNX files they
        run: one per flavour, layout and precision); `stack` closes them and removes the
        files. A backend this machine cannot run is skipped, with a line to `log`.

        Raises:
            BertrtError: no backend is left to run; a variant an `.onnx` file is not.
        """
        variants = [Variant.parse(name) for name in self.backends]
        exports: dict[tuple[str, bool, str], Path] = {}
        tmp: Path | None = None
        spinning = len(self.backends) == 1 if options.spin is None else options.spin
        running, skipped = [], []
        for variant in variants:
            onnx_path = None
            if variant.backend in ONNX_BACKENDS:
                if self.is_dir:
                    if tmp is None:
                        tmp = Path(stack.enter_context(
                            tempfile.TemporaryDirectory(prefix="bertrt-bench-")))
                    onnx_path = self._export(variant, options, exports, tmp, log)
                else:
                    onnx_path = self._check_variant(variant)
            try:
                backend = make_backend(variant.backend, onnx_path=onnx_path, model=self.model,
                                       threads=options.thread_count, spinning=spinning,
                                       precision=variant.precision or "fp32",
                                       packed=bool(variant.packed))
            except BackendUnavailable as exc:
                skipped.append(f"{variant.label}: {exc}")
                continue
            backend.label = variant.label
            stack.callback(backend.close)
            running.append(backend)
        if not running:
            raise BertrtError(f"no backend left to run ({'; '.join(skipped)})")
        for reason in skipped:
            _say(log, f"skipping backend {reason}")
        return running

    def _export(self, variant: Variant, options: BenchOptions,
                exports: dict[tuple[str, bool, str], Path], tmp: Path, log: Log | None
                ) -> Path:
        """The temporary export `variant` runs (made once per flavour, layout, precision):
        `options.flavour` for ONNX Runtime, except int8 (standard); standard for OpenVINO."""
        assert self.model is not None
        file_precision = ("fp32" if variant.precision in (None, "bf16") else
                          variant.precision)
        flavour = ("standard" if variant.precision == "int8" else
                   options.flavour if variant.backend != "openvino" else
                   FLAVOURS["openvino"])
        key = (flavour, bool(variant.packed), file_precision)
        if key not in exports:
            what = " ".join(x for x in (flavour + "-flavour", "packed" if key[1] else "",
                                        "" if file_precision == "fp32" else file_precision)
                            if x)
            _say(log, f"exporting {self.path} to a temporary {what} ONNX file ...")
            exports[key] = self.model.export_onnx(
                tmp / f"model-{len(exports)}.onnx", flavour=flavour, packed=key[1],
                int8=file_precision == "int8", fp16=file_precision == "fp16")
        return exports[key]

    def _check_variant(self, variant: Variant) -> Path:
        """The `.onnx` file, if it is what `variant` asks for (its layout and precision)."""
        info = self.onnx_info
        assert info is not None
        packed, has = info.packed, info.precision
        wants = "fp32" if variant.precision == "bf16" else variant.precision or has
        if (variant.packed is not None and variant.packed != packed) or wants != has:
            layout = "packed" if packed else "padded"
            raise BertrtError(f"--backend {variant.label}: {self.path.name} is a {layout} "
                              f"{has} export; variants of another layout or precision are "
                              "exported from a model dir (give the dir as MODEL)")
        return self.path

    def meta(self, options: BenchOptions) -> dict[str, Any]:
        """The report's description of the model and the run."""
        flavour = (options.flavour if self.is_dir else
                   self.onnx_info.decoded.get("flavour"))  # type: ignore[union-attr]
        return {"model": str(self.path), "onnx_flavour": flavour,
                "threads": options.thread_count}


def _say(log: Log | None, line: str) -> None:
    if log is not None:
        log(line)


@dataclass
class _Limits:
    """What the model takes: vocabulary size, positions, the config's pad id."""

    vocab_size: int
    max_positions: int | None
    pad_id: int


def resolve_target(model: PathLike, options: BenchOptions | None = None, *,
                   log: Log | None = None) -> BenchTarget:
    """Resolve a model dir or an `.onnx` file into backends, weights, tokenizer and workload.

    Everything cheap is checked before anything slow (loading weights, reading the file).

    Args:
        model: A Hugging Face-layout model dir, or an `.onnx` file bertrt exported.
        options: See `BenchOptions`.
        log: Where warnings go (a vocabulary that differs from the exported one).

    Raises:
        BertrtError: a bad option, a missing or unreadable model, onnxruntime missing for an
            ONNX backend, `torch` or `texts` on an `.onnx` file without what they need.
    """
    options = options or BenchOptions()
    options.validate()
    path = Path(model)
    if not path.exists():
        raise BertrtError(f"{path}: no such file or directory (expected an .onnx file or a "
                          "model dir)")
    names = backend_names(options.backends, path.is_dir())
    if any(Variant.parse(n).backend in ("ort", "ort-cuda") for n in names):
        import_onnxruntime()  # a one-line error now rather than after loading the model
    info = None
    if path.is_dir():
        weights, tokenizer, limits = _from_model_dir(path)
    else:
        needs_weights = any(Variant.parse(n).backend == "torch" for n in names)
        info, weights, tokenizer, limits = _from_onnx(path, options, needs_weights, log)
    workload = (_text_workload(path, options, tokenizer, limits) if options.texts is not None
                else _synthetic_workload(path, options, tokenizer, limits))
    pad_id = limits.pad_id if tokenizer is None else tokenizer.pad_id
    return BenchTarget(path, names, workload, weights, info, tokenizer, pad_id)


def _from_model_dir(path: Path) -> tuple[Model, Tokenizer | None, _Limits]:
    from bertrt.model import Model

    weights = Model.load(path)
    cfg = weights.config
    tokenizer = weights.tokenizer if weights.has_tokenizer else None
    return weights, tokenizer, _Limits(cfg.vocab_size, cfg.max_position_embeddings,
                                       cfg.pad_token_id)


def _from_onnx(path: Path, options: BenchOptions, needs_weights: bool, log: Log | None
               ) -> tuple[OnnxInfo, Model | None, Tokenizer | None, _Limits]:
    """The file's description and limits; the tokenizer from `vocab` (first) or `model_dir`,
    the weights from `model_dir` when the torch backend runs."""
    from bertrt.model import Model
    from bertrt.onnx_info import describe
    from bertrt.tokenizer import Tokenizer

    info = describe(path)
    cfg = info.config or {}
    limits = _Limits(info.vocab_size or 0, cfg.get("max_position_embeddings"),
                     int(cfg.get("pad_token_id", 0) or 0))
    weights, tokenizer = None, None
    if options.model_dir is not None:
        if needs_weights:
            weights = Model.load(options.model_dir)
            tokenizer = weights.tokenizer if weights.has_tokenizer else None
        else:
            tokenizer = Tokenizer.from_path(options.model_dir, "--model-dir")
    if options.vocab is not None:
        tokenizer = Tokenizer.from_path(options.vocab, "--vocab")
    if needs_weights and weights is None:
        raise BertrtError("backend torch needs the model's weights: give --model-dir DIR "
                          f"(the model dir {path.name} was exported from)")
    if tokenizer is not None and not info.vocab_matches(tokenizer):
        _say(log, f"warning: the vocabulary given differs from the one {path.name} was "
                  "exported with (sha256 mismatch)")
    return info, weights, tokenizer, limits


def _text_workload(path: Path, options: BenchOptions, tokenizer: Tokenizer | None,
                   limits: _Limits) -> TextWorkload:
    assert options.texts is not None
    if tokenizer is None and path.is_dir():
        raise BertrtError(f"--texts needs the tokenizer: {path} has neither vocab.txt nor "
                          "tokenizer.json")
    if tokenizer is None:
        raise BertrtError(f"--texts needs the tokenizer: {path} has none; give --vocab "
                          "vocab.txt or --model-dir DIR (the model dir it came from)")
    max_positions, max_length = limits.max_positions, options.max_length
    limit = min(x for x in (tokenizer.model_max_length, max_positions) if x)
    if max_length is not None and max_positions and max_length > max_positions:
        raise BertrtError(f"--max-length {max_length} exceeds the model's "
                          f"max_position_embeddings={max_positions}")
    return TextWorkload.from_file(options.texts, tokenizer, options.batch_sizes,
                                  max_length or limit, orders=options.orders)


def _synthetic_workload(path: Path, options: BenchOptions, tokenizer: Tokenizer | None,
                        limits: _Limits) -> SyntheticWorkload:
    vocab_size, max_positions = limits.vocab_size, limits.max_positions
    if not vocab_size:
        raise BertrtError(f"{path}: cannot tell the vocabulary size (no config in its "
                          "metadata); give --model-dir DIR")
    if tokenizer is not None:
        vocab_size = min(vocab_size, tokenizer.vocab_size)
    seq_lens = list(options.seq_lens or DEFAULT_SEQ_LENS)
    if options.seq_lens is None and max_positions:
        # the default grid shrinks to what the model takes; lengths given are checked
        seq_lens = sorted({min(s, int(max_positions)) for s in seq_lens})
    return SyntheticWorkload(
        options.batch_sizes, seq_lens, vocab_size,
        special_ids=sorted(tokenizer.special_ids) if tokenizer is not None else (limits.pad_id,),
        cls_id=tokenizer.cls_id if tokenizer is not None else None,
        sep_id=tokenizer.sep_id if tokenizer is not None else None,
        max_positions=max_positions, seed=options.seed)


def benchmark_model(model: PathLike, options: BenchOptions | None = None, *,
                    log: Log | None = None, **fields: Any) -> Report:
    """Benchmark a model dir or an `.onnx` file: what `bertrt serve-bench` runs.

    The backends' outputs are cross-checked on the first batch before anything is timed
    (`bertrt.serve.crosscheck`).

    Args:
        model: A model dir, or an `.onnx` file.
        options: See `BenchOptions`; `fields` override single fields
            (`benchmark_model("dir", batch_sizes=[1], seq_lens=[128])`).
        log: Where progress notes and warnings go (e.g. stderr); None: nowhere.

    Raises:
        BertrtError: see `resolve_target`; no backend left to run.
        BackendsDisagree: the backends' outputs differ beyond the bound (nothing timed).
    """
    options = dataclasses.replace(options or BenchOptions(), **fields)
    target = resolve_target(model, options, log=log)
    timed = options.iters is not None or options.duration is not None
    with contextlib.ExitStack() as stack:
        backends = target.open_backends(stack, options, log)
        return run_benchmark(
            target.workload, backends, warmup=options.warmup,
            iters=options.iters if timed else DEFAULT_ITERS, duration=options.duration,
            pad_id=target.pad_id, meta=target.meta(options), progress=options.progress,
            gap=INTERLEAVE_GAP_S if len(backends) > 1 else 0.0)
