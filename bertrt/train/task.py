"""One class per `--task`, behind one interface, `Task`: how the loop feeds it — its datasets,
batches, forward inputs, loss and step statistics, and its evaluation. The loop and the report
talk to `Task` only; a new task (QA, say) is a subclass here, a row in `TASKS` and one in
`bertrt.train.config.TASK_KINDS`.

The pre-training data is `data.py`'s; the fine-tuning file readers and metrics are `tasks.py`'s.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bertrt.errors import BertrtError
from bertrt.tokenizer import Tokenizer, TokenizerError, train_vocab
from bertrt.train import data, losses, squad, tasks
from bertrt.train.config import TrainConfig
from bertrt.train.corpus import DataError, read_documents

if TYPE_CHECKING:
    from bertrt.train.setup import Dist

Batch = dict[str, torch.Tensor]
Say = Callable[[str], None]
_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "masked_positions", "cu_seqlens")

#: Inputs the forward reads on the host (the packed offsets: their longest length sizes the
#: attention), so they stay there; a device copy would cost a host sync to read back.
_ON_HOST = ("cu_seqlens",)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """`batch` on `device`. To CUDA the tensors go through pinned (page-locked) memory as
    non-blocking copies: the host queues them and goes on (the copy waits for nothing the
    device is doing, and nothing waits for the copy but the kernels that read it)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v if k in _ON_HOST else v.pin_memory().to(device, non_blocking=True)
            for k, v in batch.items()}


def pack(batch: Batch) -> Batch:
    """A right-padded batch in the packed (padding-free) layout `PackedModule` takes: the
    real tokens of `input_ids` and `token_type_ids` one row after another (T,), `cu_seqlens`
    (B+1,) int32 from `attention_mask` (which goes), and every other (B, S) tensor (token
    labels) packed alike; per-example tensors (B,) stay as they are."""
    mask = batch["attention_mask"].bool()  # (B, S)
    lengths = mask.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    shape = mask.shape
    out = {k: (v[mask] if v.shape[:2] == shape else v)  # (B, S) -> (T,)
           for k, v in batch.items() if k != "attention_mask"}
    out["cu_seqlens"] = cu
    return out


class Task(ABC):
    """How the loop trains and evaluates one task.

    Args:
        source: the training examples (a `data.ExampleSource`).
        eval_source: the evaluation examples, or None.
        labels: the label names by id (fine-tuning), or None.
        batch_size: examples per micro-batch, per process.
        grad_accum: micro-batches per optimizer step.
    """

    #: Names of the summed statistics `loss` returns (see `losses`).
    stat_names: ClassVar[tuple[str, ...]]
    #: The metrics shown beside the loss: (key of a row, label on the bar, label at the end).
    shown: ClassVar[tuple[tuple[str, str, str], ...]]
    #: The eval metric that picks `OUT/best` (higher is better), or None for no best model.
    best_metric: ClassVar[str | None] = None
    #: How the `shown` metrics are written (a format spec: ratios as percentages).
    shown_format: ClassVar[str] = ".1%"

    def __init__(self, source: Any, eval_source: Any | None, labels: list[str] | None, *,
                 batch_size: int, grad_accum: int) -> None:
        self.source, self.eval_source, self.labels = source, eval_source, labels
        self.batch_size, self.grad_accum = batch_size, grad_accum

    # ------------------------------------------------------------------ what a task defines
    @classmethod
    @abstractmethod
    def build(cls, cfg: TrainConfig, tokenizer: Tokenizer, paths: list[Path],
              label2id: dict[str, int] | None, say: Say) -> Task:
        """The task with its datasets read from `paths` (and `cfg.eval_data`); `label2id` is
        a resumed checkpoint's (its label ids are kept)."""

    @staticmethod
    @abstractmethod
    def train_vocab(paths: list[Path], size: int) -> Tokenizer:
        """A WordPiece vocabulary of `size` trained on the task's training files."""

    @abstractmethod
    def collate(self, examples: list, indices: list[int]) -> Batch:
        """A padded batch of `examples`, whose global indices are `indices`."""

    @abstractmethod
    def counts(self, batch: Batch) -> torch.Tensor:
        """The batch's item counts: summed over a step, the loss denominators."""

    @abstractmethod
    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch,
             denominators: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to back-propagate and the summed statistics named by `stat_names`."""

    @abstractmethod
    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        """The step's (or an evaluation's) metrics from summed `stats`; `loss` among them."""

    # ------------------------------------------------------------------ the same for all
    def batch(self, step: int, micro: int, env: Dist) -> Batch:
        """This rank's micro-batch `micro` of optimizer step `step` (0-based)."""
        indices = data.batch_indices(step, micro, self.batch_size, self.grad_accum, env.rank,
                                     env.world)
        return self.collate([self.source[i] for i in indices], indices)

    def inputs(self, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        """The forward's keyword arguments, on `device`."""
        return {k: batch[k].to(device) for k in _INPUTS if k in batch}

    def evaluate(self, net: torch.nn.Module, batch_size: int, env: Dist,
                 autocast: Any) -> dict[str, float]:
        """Metrics on the eval data, each rank a strided share, combined over ranks."""
        net.eval()
        stats = torch.zeros(len(self.stat_names), dtype=torch.float64)
        preds: list[Any] = []
        golds: list[Any] = []
        ones = torch.ones(2, dtype=torch.float64, device=env.device)  # loss sums, not means
        mine = list(range(env.rank, len(self.eval_source), env.world))
        with torch.no_grad():
            for start in range(0, len(mine), batch_size):
                indices = mine[start:start + batch_size]
                batch = to_device(self.collate([self.eval_source[i] for i in indices], indices),
                                  env.device)
                with autocast:
                    outputs = net(**self.inputs(batch, env.device))
                    _, batch_stats = self.loss(outputs, batch, ones)
                stats += batch_stats.cpu()
                batch_preds, batch_golds = self._predictions(outputs, batch)
                preds += batch_preds
                golds += batch_golds
        net.train()
        env.all_sum(stats)
        return self._scores(self.summarize(stats), preds, golds, env)

    def _predictions(self, outputs: dict[str, torch.Tensor], batch: Batch) -> tuple[list, list]:
        """An eval batch's predictions and gold labels, for `_scores` (none by default)."""
        return [], []

    def _scores(self, summary: dict[str, float], preds: list, golds: list,
                env: Dist) -> dict[str, float]:
        """The evaluation's scores from its summed statistics and collected predictions."""
        return summary


# ====================================================================== pre-training
class PretrainTask(Task):
    """Masked LM + next-sentence prediction on sentence pairs, masked as each batch is made
    (`data.collate_pretraining`, from `seed` and the example index)."""

    stat_names = losses.PRETRAINING_STATS
    shown = (("mlm_acc", "mlm", "MLM acc"), ("nsp_acc", "nsp", "NSP acc"))
    counts = staticmethod(losses.pretraining_counts)  # type: ignore[assignment]
    loss = staticmethod(losses.pretraining_loss)  # type: ignore[assignment]

    def __init__(self, source: Any, eval_source: Any | None, tokenizer: Tokenizer, seed: int,
                 mask_prob: float = 0.15, whole_word: bool = False, *, batch_size: int,
                 grad_accum: int) -> None:
        super().__init__(source, eval_source, None, batch_size=batch_size,
                         grad_accum=grad_accum)
        self.tokenizer, self.seed = tokenizer, seed
        self.mask_prob, self.whole_word = mask_prob, whole_word

    @classmethod
    def build(cls, cfg: TrainConfig, tokenizer: Tokenizer, paths: list[Path],
              label2id: dict[str, int] | None, say: Say) -> PretrainTask:
        if cfg.eval_split:  # held-out documents of the corpus itself (a function of the seed)
            source, eval_source = data.pretraining_sources(
                paths, tokenizer, cfg.seq_len, cfg.seed, cfg.eval_split)
            say(f"holding out {len(eval_source.documents):,} of "
                f"{len(source.documents) + len(eval_source.documents):,} documents "
                f"(--eval-split {cfg.eval_split}) for evaluation: {len(eval_source):,} examples")
        else:
            source = data.pretraining_source(paths, tokenizer, cfg.seq_len, cfg.seed)
            eval_source = (data.pretraining_source([Path(p) for p in cfg.eval_data], tokenizer,
                                                   cfg.seq_len, cfg.seed)
                           if cfg.eval_data else None)
        # A sentence longer than an example is cut at random: say so, as fine-tuning does (of
        # the user's files: the embedded corpus is what it is).
        long = source.stats["long_sentences"]
        if cfg.eval_split:
            long += eval_source.stats["long_sentences"]
        if cfg.data:
            _warn_truncated(say, paths, long, cfg.seq_len, _LONG_SENTENCES)
        if cfg.eval_data:
            _warn_truncated(say, cfg.eval_data, eval_source.stats["long_sentences"], cfg.seq_len,
                            _LONG_SENTENCES)
        return cls(source, eval_source, tokenizer, cfg.seed, cfg.mask_prob,
                   cfg.whole_word_mask, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)

    @staticmethod
    def train_vocab(paths: list[Path], size: int) -> Tokenizer:
        return _vocab(paths, size, (line for p in paths for doc in read_documents(p)
                                    for line in doc))

    def collate(self, examples: list, indices: list[int]) -> Batch:
        return data.collate_pretraining(examples, indices, self.tokenizer, self.seed,
                                        mask_prob=self.mask_prob, whole_word=self.whole_word)

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        s = dict(zip(self.stat_names, stats.tolist()))
        mlm_loss = s["mlm_loss_sum"] / max(s["mlm_count"], 1)
        nsp_loss = s["nsp_loss_sum"] / max(s["nsp_count"], 1)
        return {"loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss,
                "mlm_acc": s["mlm_correct"] / max(s["mlm_count"], 1),
                "nsp_loss": nsp_loss, "nsp_acc": s["nsp_correct"] / max(s["nsp_count"], 1)}


# ====================================================================== fine-tuning
class _FineTuneTask(Task):
    """A labelled file (one --data, optional one --eval-data) and cross-entropy on the labels;
    subclasses name the reader, the collator and the eval metrics."""

    stat_names = losses.CLASSIFICATION_STATS
    shown = (("accuracy", "acc", "acc"),)
    counts = staticmethod(losses.label_counts)  # type: ignore[assignment]
    loss = staticmethod(losses.classification_loss)  # type: ignore[assignment]
    #: `tasks.*_source`: reads a file into (source, label names, truncated count).
    read: ClassVar[Callable[..., tuple[Any, list[str], int]]]
    #: `tasks.collate_*`: pads examples with the pad id.
    pad_collate: ClassVar[Callable[[Sequence[data.Example], int], Batch]]
    #: `tasks.*_texts`: a file's text fields (what a vocabulary is trained on, not labels).
    texts: ClassVar[Callable[[Path], Iterator[str]]]

    def __init__(self, source: Any, eval_source: Any | None, labels: list[str], pad_id: int, *,
                 batch_size: int, grad_accum: int) -> None:
        super().__init__(source, eval_source, labels, batch_size=batch_size,
                         grad_accum=grad_accum)
        self.pad_id = pad_id

    @classmethod
    def build(cls, cfg: TrainConfig, tokenizer: Tokenizer, paths: list[Path],
              label2id: dict[str, int] | None, say: Say) -> _FineTuneTask:
        if len(paths) != 1:
            raise BertrtError(f"--task {cfg.task} takes one --data file, got {len(paths)}")
        source, labels, truncated = cls.read(paths[0], tokenizer, cfg.seq_len, cfg.seed,
                                             label2id=label2id)
        _warn_truncated(say, paths[0], truncated, cfg.seq_len)
        eval_source = None
        if cfg.eval_data:
            if len(cfg.eval_data) != 1:
                raise BertrtError(f"--task {cfg.task} takes one --eval-data file")
            eval_source, _, truncated = cls.read(
                Path(cfg.eval_data[0]), tokenizer, cfg.seq_len, cfg.seed,
                label2id={name: i for i, name in enumerate(labels)})
            _warn_truncated(say, Path(cfg.eval_data[0]), truncated, cfg.seq_len)
        else:
            say(f"notice: no --eval-data: no evaluation, and no best checkpoint by "
                f"{cls.best_metric}")
        return cls(source, eval_source, list(labels), tokenizer.pad_id,
                   batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)

    @classmethod
    def train_vocab(cls, paths: list[Path], size: int) -> Tokenizer:  # type: ignore[override]
        return _vocab(paths, size, (text for p in paths for text in cls.texts(p)))

    def collate(self, examples: list, indices: list[int]) -> Batch:
        return self.pad_collate(examples, self.pad_id)

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        s = dict(zip(self.stat_names, stats.tolist()))
        return {"loss": s["loss_sum"] / max(s["count"], 1),
                "accuracy": s["correct"] / max(s["count"], 1)}

    def _scores(self, summary: dict[str, float], preds: list, golds: list,
                env: Dist) -> dict[str, float]:
        preds = [p for part in env.gather(preds) for p in part]
        golds = [g for part in env.gather(golds) for g in part]
        return {"loss": summary["loss"], **self._metrics(preds, golds)}

    @abstractmethod
    def _metrics(self, preds: list, golds: list) -> dict[str, float]:
        """The task's eval metrics over every rank's predictions."""


_INPUTS_CUT = "input(s) longer than --seq-len {seq_len} were truncated"
_LONG_SENTENCES = ("sentence(s) longer than --seq-len {seq_len} allows ({tokens} tokens) were "
                   "cut to fit; write one sentence per line to train on all of them")


def _warn_truncated(say: Say, paths: Path | Sequence[str | Path], count: int, seq_len: int,
                    what: str = _INPUTS_CUT) -> None:
    """A warning naming the file(s) and how many of their inputs were cut to --seq-len."""
    if count:
        names = paths if isinstance(paths, Path) else ", ".join(map(str, paths))
        say(f"warning: {names}: {count} " + what.format(seq_len=seq_len, tokens=seq_len - 3))


def _vocab(paths: list[Path], size: int, texts: Iterable[str]) -> Tokenizer:
    """A WordPiece vocabulary of `size` trained on `texts`, the text of `paths`: no text at all
    is an error naming the files, and `train_vocab`'s warnings name them too."""
    names, found = ", ".join(map(str, paths)), 0

    def counted() -> Iterator[str]:
        nonlocal found
        for text in texts:
            found += bool(text.strip())
            yield text

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokenizer = train_vocab(texts=counted(), size=size)
    except TokenizerError:
        if found:
            raise
        raise DataError(f"{names}: the corpus is empty (no text to train a vocabulary on)"
                        ) from None
    for warning in caught:  # they name their source "texts": it is these files
        message = str(warning.message)
        warnings.warn(f"{names}: {message.removeprefix('texts: ')}", warning.category,
                      stacklevel=2)
    return tokenizer


class ClassifyTask(_FineTuneTask):
    """Sequence classification: a label per text (or text pair); macro-F1 picks the best. Two
    labels (matching, paraphrase) are also scored by the positive class's F1 (label id 1)."""

    shown = (("accuracy", "acc", "acc"), ("f1", "f1", "F1"))  # F1: two-class evaluations
    best_metric = "macro_f1"
    read = staticmethod(tasks.classification_source)
    pad_collate = staticmethod(tasks.collate_classification)
    texts = staticmethod(tasks.classification_texts)

    def _predictions(self, outputs: dict[str, torch.Tensor], batch: Batch) -> tuple[list, list]:
        return outputs["logits"].argmax(-1).cpu().tolist(), batch["labels"].tolist()

    def _metrics(self, preds: list, golds: list) -> dict[str, float]:
        return tasks.classification_metrics(preds, golds, len(self.labels or []))


class TagTask(_FineTuneTask):
    """Token tagging (BIO): a tag per word, on its first wordpiece; entity F1 picks the best."""

    best_metric = "f1"
    read = staticmethod(tasks.tagging_source)
    pad_collate = staticmethod(tasks.collate_tagging)
    texts = staticmethod(tasks.conll_texts)

    def _predictions(self, outputs: dict[str, torch.Tensor], batch: Batch) -> tuple[list, list]:
        names = self.labels or []
        preds, golds = [], []
        predicted = outputs["logits"].argmax(-1).cpu()  # (B, S)
        for p_row, g_row in zip(predicted.tolist(), batch["labels"].tolist()):
            keep = [i for i, g in enumerate(g_row) if g != losses.IGNORE]  # first sub-tokens
            preds.append([names[p_row[i]] for i in keep])
            golds.append([names[g_row[i]] for i in keep])
        return preds, golds

    def _metrics(self, preds: list, golds: list) -> dict[str, float]:
        return tasks.tagging_metrics(preds, golds)


class RegressTask(_FineTuneTask):
    """Regression: a score per text (or text pair), such as STS-B's similarity; one output,
    mean squared error; the eval's Pearson correlation picks the best."""

    stat_names = losses.REGRESSION_STATS
    shown = (("pearson", "r", "Pearson r"),)
    shown_format = ".3f"
    best_metric = "pearson"
    counts = staticmethod(losses.score_counts)  # type: ignore[assignment]
    loss = staticmethod(losses.regression_loss)  # type: ignore[assignment]
    read = staticmethod(tasks.regression_source)
    pad_collate = staticmethod(tasks.collate_regression)
    texts = staticmethod(tasks.regression_texts)

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        s = dict(zip(self.stat_names, stats.tolist()))
        n = max(s["count"], 1)
        # Pearson's r from the step's sums: cov / (sd_pred sd_gold), 0 for a constant side
        cov = s["cross_sum"] - s["pred_sum"] * s["gold_sum"] / n
        var_p = s["pred_sq_sum"] - s["pred_sum"] ** 2 / n
        var_g = s["gold_sq_sum"] - s["gold_sum"] ** 2 / n
        denominator = math.sqrt(max(var_p, 0.0) * max(var_g, 0.0))
        return {"loss": s["loss_sum"] / n, "pearson": cov / denominator if denominator else 0.0}

    def _predictions(self, outputs: dict[str, torch.Tensor], batch: Batch) -> tuple[list, list]:
        return outputs["logits"].float().reshape(-1).cpu().tolist(), batch["labels"].tolist()

    def _metrics(self, preds: list, golds: list) -> dict[str, float]:
        return tasks.regression_metrics(preds, golds)
class QATask(Task):
    """Extractive question answering on SQuAD v1.1/v2.0 files: the answer's start and end
    token in each window (`[CLS]` where the window does not hold it), cross-entropy on both;
    evaluated as SQuAD is, on whole questions (`bertrt.train.squad`); F1 picks the best."""

    stat_names = ("loss_sum", "correct", "count")
    shown = (("span_acc", "span", "span acc"),)
    best_metric = "f1"

    def __init__(self, source: Any, eval_source: Any | None, pad_id: int, cfg: TrainConfig,
                 null_answers: bool, *, batch_size: int, grad_accum: int) -> None:
        super().__init__(source, eval_source, None, batch_size=batch_size,
                         grad_accum=grad_accum)
        self.pad_id, self.max_answer_length = pad_id, cfg.max_answer_length
        self.null_threshold = cfg.null_threshold if null_answers else None

    @classmethod
    def build(cls, cfg: TrainConfig, tokenizer: Tokenizer, paths: list[Path],
              label2id: dict[str, int] | None, say: Say) -> QATask:
        if len(paths) != 1 or len(cfg.eval_data) > 1:
            raise BertrtError("--task qa takes one --data file (and at most one --eval-data)")

        def windows(path: Path, training: bool) -> tuple[squad.QAWindows, bool]:
            examples, v2 = squad.read_squad(path, training=training)
            return squad.training_windows(examples, tokenizer, cfg.seq_len, cfg.doc_stride,
                                          cfg.max_query_length), v2

        train, v2 = windows(paths[0], True)
        say(f"{paths[0]}: {len(train.examples):,} questions in {len(train.windows):,} windows "
            f"of {cfg.seq_len} tokens (--doc-stride {cfg.doc_stride})")
        eval_source = None
        if cfg.eval_data:
            held_out, eval_v2 = windows(Path(cfg.eval_data[0]), False)
            v2 |= eval_v2
            eval_source = squad.WindowSource(held_out, cfg.seed, shuffle=False)
        else:
            say("notice: no --eval-data: no evaluation, and no best checkpoint by f1")
        return cls(squad.WindowSource(train, cfg.seed), eval_source, tokenizer.pad_id, cfg, v2,
                   batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)

    @staticmethod
    def train_vocab(paths: list[Path], size: int) -> Tokenizer:
        return _vocab(paths, size, (text for p in paths for text in squad.squad_texts(p)))

    def collate(self, examples: list, indices: list[int]) -> Batch:
        out = tasks.collate_classification(  # pads ids, mask and types alike
            [data.Example(e.input_ids.tolist(), e.token_type_ids.tolist()) for e in examples],
            self.pad_id)
        del out["labels"]
        out["start_positions"] = torch.tensor([e.start for e in examples], dtype=torch.int64)
        out["end_positions"] = torch.tensor([e.end for e in examples], dtype=torch.int64)
        out["windows"] = torch.tensor([e.number for e in examples], dtype=torch.int64)
        return out

    def counts(self, batch: Batch) -> torch.Tensor:
        return torch.tensor([float(len(batch["windows"]))], dtype=torch.float64)

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch,
             denominators: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of the start and end cross-entropies over the window's tokens (padding
        excluded), summed over windows / the step's window count."""
        start, end = outputs["start_logits"].float(), outputs["end_logits"].float()  # (B, S)
        padding = batch["attention_mask"].to(start.device) == 0
        start = start.masked_fill(padding, torch.finfo(start.dtype).min)
        end = end.masked_fill(padding, torch.finfo(end.dtype).min)
        gold_start = batch["start_positions"].to(start.device)
        gold_end = batch["end_positions"].to(start.device)
        loss_sum = (torch.nn.functional.cross_entropy(start, gold_start, reduction="sum")
                    + torch.nn.functional.cross_entropy(end, gold_end, reduction="sum")) / 2
        with torch.no_grad():
            correct = ((start.argmax(-1) == gold_start) & (end.argmax(-1) == gold_end)).sum()
            # a fill on the device, not a copy from the host (which would wait for the device)
            count = torch.full((), float(len(gold_start)), dtype=torch.float64,
                               device=start.device)
            stats = torch.stack([loss_sum.double(), correct.double(), count])
        return loss_sum / denominators[0].clamp(min=1), stats

    def summarize(self, stats: torch.Tensor) -> dict[str, float]:
        s = dict(zip(self.stat_names, stats.tolist()))
        return {"loss": s["loss_sum"] / max(s["count"], 1),
                "span_acc": s["correct"] / max(s["count"], 1)}

    def _predictions(self, outputs: dict[str, torch.Tensor], batch: Batch) -> tuple[list, list]:
        lengths = batch["attention_mask"].sum(1).tolist()
        start, end = outputs["start_logits"].float().cpu(), outputs["end_logits"].float().cpu()
        return [(int(w), start[b, :n].numpy(), end[b, :n].numpy())
                for b, (w, n) in enumerate(zip(batch["windows"].tolist(), lengths))], []

    def _scores(self, summary: dict[str, float], preds: list, golds: list,
                env: Dist) -> dict[str, float]:
        windows = self.eval_source.windows  # type: ignore[union-attr]
        found = {w: (s, e) for part in env.gather(preds) for w, s, e in part}
        answers = squad.predict_answers(windows, [found[w][0] for w in range(len(found))],
                                        [found[w][1] for w in range(len(found))],
                                        self.max_answer_length, self.null_threshold)
        return {**summary, **squad.squad_metrics(windows.examples, answers)}


#: The class of each `--task`.
TASKS: dict[str, type[Task]] = {"pretrain": PretrainTask, "classify": ClassifyTask,
                                "tag": TagTask, "regress": RegressTask, "qa": QATask}
