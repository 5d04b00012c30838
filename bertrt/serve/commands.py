"""`bertrt embed` and `bertrt predict`: the inference engine on a file of texts.

One text per line (UTF-8; `-` reads stdin); every line is a text, a blank one included, so
output line i answers input line i. Outputs are written whole or not at all
(`bertrt.fileio`); without `-o`, JSON lines go to stdout. The main CLI (`bertrt/cli.py`)
registers both commands; the work is `bertrt.serve.engine.InferenceEngine`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bertrt.errors import BertrtError, invalid_utf8_message, user_errors

if TYPE_CHECKING:
    import numpy as np

    from bertrt.serve.engine import InferenceEngine


def read_lines(source: str, option: str) -> list[str]:
    """Every line of a UTF-8 file (`-`: stdin), blank lines kept, `\\r\\n` read as `\\n`.

    Raises:
        BertrtError: a missing or unreadable file, or a line that is not valid UTF-8 (named).
    """
    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BertrtError(f"{option} {path}: no such file") from None
        except IsADirectoryError:
            raise BertrtError(f"{option} {path}: is a directory (expected a text file, one "
                              "text per line)") from None
        except OSError as exc:
            raise BertrtError(f"{option} {path}: cannot read ({exc.strerror or exc})") from None
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":  # the newline that ends the last line starts no text
        raw_lines.pop()
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BertrtError(f"{option} {invalid_utf8_message(source, number, exc.start)}"
                              ) from None
        lines.append(line.removeprefix("\ufeff") if number == 1 else line)
    return lines


def _check_output(output: Path | None, suffixes: tuple[str, ...]) -> None:
    if output is None:
        return
    if output.suffix not in suffixes:
        raise BertrtError(f"-o {output}: expected a file ending in {' or '.join(suffixes)}")
    if not output.parent.is_dir():
        raise BertrtError(f"-o {output}: folder {output.parent} does not exist")


def _jsonl(rows: Iterator[Any]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _emit(text: str, output: Path | None) -> None:
    from bertrt.fileio import atomic_write_text

    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(output, text)


@dataclass
class EngineArgs:
    """The options both commands pass to `InferenceEngine`."""

    model: str
    backend: str
    precision: str
    packed: bool | None
    threads: int | None
    batch_tokens: int | None
    vocab: str | None

    def open(self) -> InferenceEngine:
        from bertrt.serve.engine import InferenceEngine

        return InferenceEngine(self.model, backend=self.backend, precision=self.precision,
                               packed=self.packed, threads=self.threads,
                               max_batch_tokens=self.batch_tokens, vocab=self.vocab)


def _run(call: Callable[[], Any], engine: InferenceEngine, verb: str) -> Any:
    """`call()`, its warnings printed as `warning: ...` lines, then one summary line (stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    stats = engine.stats
    rate = stats.texts / stats.seconds if stats.seconds else 0.0
    click.echo(f"{verb} {stats.texts} texts in {stats.seconds:.2f} s ({rate:,.0f} texts/s, "
               f"{stats.batches} batches) with {engine.backend.description}"
               + (f" ({engine.choice})" if engine.choice else ""), err=True)
    return result


def _engine_options(fn: Callable[..., Any] | None = None, *,
                    texts: str = "required") -> Any:
    """The options the commands share; the command gets the engine's as one `EngineArgs`.
    `texts`: "required", "optional" (a QA model takes questions and contexts instead) or
    "none" (no --texts option)."""
    if fn is None:
        return functools.partial(_engine_options, texts=texts)
    names = [field.name for field in dataclasses.fields(EngineArgs)]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        return fn(EngineArgs(**{name: kwargs.pop(name) for name in names}), **kwargs)

    options = [
        click.argument("model"),
        *([] if texts == "none" else [click.option(
            "--texts", "texts_path", required=texts == "required", metavar="FILE|-",
            help="UTF-8 texts, one per line ('-': stdin).")]),
        click.option("--backend", default="auto", show_default=True,
                     help="auto | ort | ort-cuda | openvino | torch (auto: the fastest "
                          "installed CPU runtime at the precisions --precision admits, timed "
                          "at load)."),
        click.option("--precision", default="fp32", show_default=True,
                     help="fp32 | int8 (ort) | bf16 (openvino, on a CPU with native bf16) | "
                          "fp16 (ort-cuda). With --backend auto: the loosest accepted (bf16 "
                          "admits fp32 and bf16; int8 all three)."),
        click.option("--packed/--padded", default=None,
                     help="Padding-free batches, or each padded to its longest [packed on "
                          "ort, padded on torch; an .onnx MODEL: as exported]."),
        click.option("--threads", type=int, default=None,
                     help="Intra-op threads [the runtime's default: all cores]."),
        click.option("--batch-tokens", type=int, default=None,
                     help="Positions per batch: batch size x longest when padded, the real "
                          "tokens when packed; a longer text runs alone [the backend's: 512 "
                          "on ONNX Runtime's CPU provider, 2048 on OpenVINO and torch, "
                          "16384 on CUDA]."),
        click.option("--vocab", metavar="PATH",
                     help="For an .onnx MODEL: vocab.txt, or the model dir it was exported "
                          "from [the folder holding MODEL]."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bar on stderr [on a terminal, for long inputs]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@_engine_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="OUT.npy ((N, H) float32) or OUT.jsonl ({\"embedding\": [...]} per line) "
                   "[JSON lines on stdout].")
@click.option("--pooling", default=None,
              help="mean | cls | max [the model dir's sentence-transformers config, else cls: "
                   "the [CLS] hidden state].")
@click.option("--normalize/--no-normalize", default=None,
              help="L2-normalize [as the sentence-transformers config says, else no].")
@user_errors
def embed(engine_args: EngineArgs, texts_path: str, progress: bool | None,
          output: Path | None, pooling: str | None, normalize: bool | None) -> None:
    """Embed each line of --texts with MODEL (a model dir or an .onnx file).

    Pools the final hidden states over each text's tokens (mean, max or [CLS]), as the
    model's sentence-transformers config says unless --pooling is given. The Python API:
    `bertrt.InferenceEngine(...).embed(texts)`.
    """
    _check_output(output, (".npy", ".jsonl"))
    texts = read_lines(texts_path, "--texts")
    with engine_args.open() as engine:
        vectors = _run(lambda: engine.embed(texts, pooling, normalize, progress=progress),
                       engine, "embedded")
    if output is not None and output.suffix == ".npy":
        _save_npy(output, vectors)
    else:
        _emit(_jsonl({"embedding": _floats(v)} for v in vectors), output)


def _floats(vector: np.ndarray) -> list[float]:
    """float32 values as the shortest decimals that read back to the same float32."""
    return [float(str(x)) for x in vector]


def _save_npy(path: Path, array: np.ndarray) -> None:
    import numpy as np

    from bertrt.fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # np.save(path) would add .npy
        np.save(f, array)


@click.command()
@_engine_options(texts="optional")
@click.option("--pairs", "pairs_path", metavar="FILE",
              help="Second texts, one per line of --texts (a classifier of text pairs).")
@click.option("--questions", "questions_path", metavar="FILE",
              help="QA model: questions, one per line (with --contexts).")
@click.option("--contexts", "contexts_path", metavar="FILE",
              help="QA model: the context of each question, one per line.")
@click.option("--squad", "squad_path", metavar="FILE",
              help="QA model: the questions and contexts of a SQuAD JSON file instead.")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="QA model: answers per question.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="OUT.jsonl [stdout].")
@click.option("--raw-scores", is_flag=True,
              help="Add each classification's logits (every label, in id order).")
@user_errors
def predict(engine_args: EngineArgs, texts_path: str | None, progress: bool | None,
            pairs_path: str | None, questions_path: str | None, contexts_path: str | None,
            squad_path: str | None, top_k: int, output: Path | None, raw_scores: bool) -> None:
    """Label each line of --texts with MODEL, by its head: one JSON line per text.

    A sequence classifier gives {"label": ..., "score": ...} (labels from id2label); a token
    classifier gives {"entities": [{"entity", "start", "end", "text", "score"}, ...]}, with
    character offsets into the line. A question-answering model takes --questions and
    --contexts (or --squad) instead and gives {"answer", "score", "start", "end"} per question
    (with --top-k N: {"answers": [...]}; from --squad, with its "id"). The Python API:
    `bertrt.InferenceEngine(...).predict`, `.tag` and `.answer`.
    """
    _check_output(output, (".jsonl",))
    qa_inputs = {"--questions": questions_path, "--contexts": contexts_path,
                 "--squad": squad_path}
    if any(qa_inputs.values()):
        return _predict_answers(engine_args, texts_path, qa_inputs, top_k, output)
    if texts_path is None:
        raise BertrtError("--texts FILE is required (or, for a question-answering model, "
                          "--questions and --contexts, or --squad)")
    texts = read_lines(texts_path, "--texts")
    pairs = None if pairs_path is None else read_lines(pairs_path, "--pairs")
    if pairs is not None and len(pairs) != len(texts):
        raise BertrtError(f"--pairs {pairs_path}: {len(pairs)} lines, but --texts has "
                          f"{len(texts)} (expected one pair per text)")
    with engine_args.open() as engine:
        if engine.head == "question-answering":
            raise BertrtError(f"{engine_args.model} is a question-answering model: give "
                              "--questions and --contexts (or --squad), not --texts")
        if engine.head == "token-classification":
            if pairs is not None:
                raise BertrtError(f"--pairs: {engine_args.model} is a token classifier, which "
                                  "tags single texts")
            found = _run(lambda: engine.tag(texts, progress=progress), engine, "tagged")
            rows: Iterator[Any] = ({"entities": e} for e in found)
        else:  # the engine says what a model without a classifier is for
            rows = iter(_run(lambda: engine.predict(texts, pairs, raw_scores,
                                                    progress=progress), engine, "labelled"))
        _emit(_jsonl(rows), output)


def _predict_answers(engine_args: EngineArgs, texts_path: str | None,
                     qa_inputs: dict[str, str | None], top_k: int, output: Path | None) -> None:
    """`bertrt predict` on a question-answering model."""
    questions_path, contexts_path, squad_path = qa_inputs.values()
    if texts_path is not None:
        raise BertrtError("--texts is for classifiers and taggers; a question-answering model "
                          "takes --questions and --contexts, or --squad")
    ids: list[str] | None = None
    if squad_path is not None:
        if questions_path or contexts_path:
            raise BertrtError("give --squad FILE, or --questions and --contexts, not both")
        from bertrt.train.squad import read_squad

        examples, _ = read_squad(squad_path)
        ids = [e.id for e in examples]
        questions, contexts = [e.question for e in examples], [e.context for e in examples]
    else:
        missing = [flag for flag, path in qa_inputs.items() if path is None and flag != "--squad"]
        if missing:
            raise BertrtError(f"{missing[0]} FILE is required with "
                              f"{'--contexts' if missing[0] == '--questions' else '--questions'}")
        questions = read_lines(questions_path, "--questions")  # type: ignore[arg-type]
        contexts = read_lines(contexts_path, "--contexts")  # type: ignore[arg-type]
        if len(questions) != len(contexts):
            raise BertrtError(f"--contexts {contexts_path}: {len(contexts)} lines, but "
                              f"--questions has {len(questions)} (expected one context per "
                              "question)")
    with engine_args.open() as engine:
        found = _run(lambda: engine.answer(questions, contexts, top_k), engine, "answered")
    rows = [answer if top_k == 1 else {"answers": answer} for answer in found]
    if ids is not None:
        rows = [{"id": qid, **row} for qid, row in zip(ids, rows)]
    _emit(_jsonl(iter(rows)), output)
