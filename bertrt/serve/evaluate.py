"""`bertrt eval MODEL --data FILE`: a model's scores on a labelled file, by the model's head.

Each head that can be evaluated has one entry in `EVALUATORS`: a function from an
`InferenceEngine`, the data file and the `EvalSettings` to a dict of metrics. Today:
question answering on SQuAD v1.1/v2.0 files (exact match and F1, as the official scripts;
`bertrt.train.squad`), read from the model exactly as `bertrt train` evaluates it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bertrt.errors import BertrtError, user_errors
from bertrt.serve.commands import EngineArgs, _engine_options, _run

if TYPE_CHECKING:
    from bertrt.serve.engine import InferenceEngine


@dataclass(frozen=True)
class EvalSettings:
    """How a file is read and answers are chosen (the `bertrt train` flags of the same
    names; None: as training defaults them)."""

    seq_len: int | None = None
    doc_stride: int | None = None
    max_query_length: int = 64
    max_answer_length: int = 30
    null_threshold: float = 0.0


def evaluate_squad(engine: InferenceEngine, path: Path, settings: EvalSettings
                   ) -> dict[str, Any]:
    """Exact match and F1 of a question-answering model on a SQuAD file (the null answer
    competes only in a v2.0 file)."""
    from bertrt.serve import qa
    from bertrt.train import squad

    seq_len = settings.seq_len or min(qa.MAX_SEQ_LEN, engine.max_length)
    if seq_len > engine.max_length:
        raise BertrtError(f"--seq-len {seq_len} exceeds the model's max length "
                          f"{engine.max_length}")
    doc_stride = settings.doc_stride
    if doc_stride is None:  # as `bertrt train` defaults it
        doc_stride = min(qa.DOC_STRIDE, max(0, seq_len - settings.max_query_length - 3) // 2)
    qa.check_settings(seq_len, doc_stride, settings.max_query_length,
                      settings.max_answer_length, what="--")
    examples, v2 = squad.read_squad(path)
    windows = squad.training_windows(examples, engine.tokenizer, seq_len, doc_stride,
                                     settings.max_query_length)
    logits = qa.run_windows(engine, windows.windows)
    answers = squad.predict_answers(windows, logits.start, logits.end,
                                    settings.max_answer_length,
                                    settings.null_threshold if v2 else None)
    engine.stats.texts, engine.stats.batches = len(examples), logits.batches
    engine.stats.tokens, engine.stats.positions = logits.tokens, logits.positions
    return squad.squad_metrics(examples, answers)


#: The evaluation of each head.
EVALUATORS: dict[str, Callable[[InferenceEngine, Path, EvalSettings], dict[str, Any]]] = {
    "question-answering": evaluate_squad,
}


@click.command("eval")
@_engine_options(texts="none")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="The labelled file: a SQuAD v1.1/v2.0 JSON file for a QA model.")
@click.option("--seq-len", type=click.IntRange(min=8), default=None,
              help="QA: tokens per window [384, or the model's max length if smaller].")
@click.option("--doc-stride", type=click.IntRange(min=0), default=None,
              help="QA: context tokens consecutive windows share [128, or half a window's "
                   "context when --seq-len is short].")
@click.option("--max-query-length", type=click.IntRange(min=1), default=64, show_default=True,
              help="QA: questions are cut to this many tokens.")
@click.option("--max-answer-length", type=click.IntRange(min=1), default=30,
              show_default=True, help="QA: the longest answer read, in tokens.")
@click.option("--null-threshold", type=float, default=0.0, show_default=True,
              help="QA, SQuAD v2.0: answer nothing when the null answer's score exceeds the "
                   "best span's by more than this.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@user_errors
def evaluate(engine_args: EngineArgs, progress: bool | None, data_path: Path,
             seq_len: int | None, doc_stride: int | None, max_query_length: int,
             max_answer_length: int, null_threshold: float, as_json: bool) -> None:
    """Score MODEL on the labelled file --data, by its head (question answering: exact match
    and F1 on a SQuAD file, as the official evaluation computes them)."""
    if not data_path.is_file():
        raise BertrtError(f"--data {data_path}: file not found")
    settings = EvalSettings(seq_len, doc_stride, max_query_length, max_answer_length,
                            null_threshold)
    with engine_args.open() as engine:
        evaluator = EVALUATORS.get(engine.head)
        if evaluator is None:
            raise BertrtError(f"{engine_args.model}: a {engine.head} model; bertrt eval scores "
                              f"{', '.join(EVALUATORS)} models")
        metrics = _run(lambda: evaluator(engine, data_path, settings), engine, "evaluated")
    if as_json:
        click.echo(json.dumps(metrics))
        return
    for key, value in metrics.items():
        click.echo(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
