"""`TrainConfig`: every setting of a training run, typed, filled by the `bertrt train` command.

A run is a pure function of the fields in `TRAJECTORY_FIELDS` (plus the world size): two runs
that agree on them compute the same parameters. `--resume` checks them against the checkpoint's
and names the first that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

from bertrt.config import PRESETS
from bertrt.errors import BertrtError
from bertrt.train.stages import parse_patterns, parse_stages


@dataclass(frozen=True)
class TaskKind:
    """What the settings need to know of a `--task` (how it trains: `bertrt.train.task`)."""

    head: str  #: the model head it trains
    lr: float  #: its default peak learning rate
    corpus: bool  #: it reads documents: the embedded corpus without --data, and --eval-split
    #: The `problem_type` written to `config.json` (Hugging Face's key), or None.
    problem_type: str | None = None


TASK_KINDS = {
    "pretrain": TaskKind("pretraining", 1e-3, corpus=True),
    "classify": TaskKind("classification", 1e-4, corpus=False),
    "tag": TaskKind("token-classification", 1e-4, corpus=False),
    # one output (num_labels=1), mean squared error, as BertForSequenceClassification regresses
    "regress": TaskKind("classification", 1e-4, corpus=False, problem_type="regression"),
    "qa": TaskKind("question-answering", 1e-4, corpus=False),
}
TASKS = tuple(TASK_KINDS)
#: The tasks whose batches train packed (`--packed`): their losses read pooled outputs or
#: per-token ones with their labels packed alike (`bertrt.train.task.Task.pack`).
PACKED_TASKS = ("classify", "tag", "regress")
SCHEDULES = ("linear", "poly")
OPTIMIZERS = ("adamw", "lamb")
PRECISIONS = ("fp32", "bf16", "fp16")

#: Fields that decide what a run computes; a resumed run must agree on every one of them.
TRAJECTORY_FIELDS = (
    "task", "data", "eval_data", "eval_split", "model", "preset", "vocab", "vocab_size",
    "batch_size", "seq_len", "max_steps", "lr", "weight_decay", "warmup", "schedule",
    "optimizer", "precision", "grad_accum", "clip", "seed", "mask_prob", "whole_word_mask",
    "freeze", "stages", "layer_lr_decay", "doc_stride", "max_query_length",
)


def _setting(default: Any, help: str, shown: str | None = None, **option: Any) -> Any:
    """A field and its `bertrt train` option: a one-line `help`; `shown`, the default in words
    where it is computed or empty (None, no file, a flag that is off); and for the option `min`
    (an integer's least value) or `choices` (a string's values). `bertrt.train.cli` builds the
    option from the field's type, default and these."""
    metadata = {"help": help, **option}
    if shown is not None:
        metadata["shown"] = shown
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Settings of `bertrt train`: one field per flag, its help text in the field's metadata
    (`dataclasses.fields(TrainConfig)[i].metadata["help"]`, shown by `bertrt train --help`).

    A field left `None` is filled in by `__post_init__` from the others (`lr` from the task,
    `eval_every` from `save_every`, `eval_split` from whether the embedded corpus is used).
    """

    task: str = _setting("pretrain", "pretrain (MLM + NSP), classify (sequence labels), tag "
                         "(token labels), regress (a score per text or pair) or qa (answer "
                         "spans, SQuAD).", choices=TASKS)
    data: tuple[str, ...] = _setting(
        (), "Training file(s). Pretrain: text (a sentence per line, blank line between "
        "documents) or JSONL with 'text'. Classify: .csv/.tsv/.jsonl (text, text_pair, "
        "label); regress: the same, a number as label. Tag: CoNLL. QA: SQuAD v1.1/v2.0 JSON.",
        shown="pretrain: the embedded corpus")
    eval_data: tuple[str, ...] = _setting(
        (), "Held-out file(s), evaluated every --eval-every steps and at the end.",
        shown="none")
    eval_split: float | None = _setting(
        None, "Pretrain: hold out this fraction of the documents (by --seed) to evaluate, in "
        "[0, 0.5).", shown="0.02 for the embedded corpus, else 0")
    model: str | None = _setting(
        None, "Start from this Hugging Face-layout BERT dir (missing heads start fresh).",
        shown="none: --preset")
    preset: str | None = _setting(None, "Start from a fresh model of this size.", shown="tiny",
                                  choices=tuple(sorted(PRESETS)))
    vocab: str | None = _setting(None, "A vocab.txt; give one for runs that repeat exactly.",
                                 shown="the model's, else one trained on the data")
    vocab_size: int = _setting(8000, "Size of a freshly trained vocabulary.", min=10)
    out: str = _setting("bertrt-out", "Output dir: checkpoints/, metrics.jsonl, run.json; at "
                        "the end the model.")
    batch_size: int = _setting(32, "Examples per micro-batch, per process.", min=1)
    seq_len: int = _setting(128, "Longest sequence in tokens, special tokens included.", min=8)
    max_steps: int = _setting(800, "Optimizer steps.", min=1)
    lr: float | None = _setting(None, "Peak learning rate.",
                                shown="1e-3 pretrain, 1e-4 fine-tuning")
    weight_decay: float = _setting(0.01, "AdamW/LAMB weight decay (never on biases and "
                                   "LayerNorm).")
    warmup: float = _setting(0.1, "Linear warm-up, as a fraction of --max-steps.")
    schedule: str = _setting("linear", "Decay after warm-up: linear, or poly (quadratic).",
                             choices=SCHEDULES)
    optimizer: str = _setting("adamw", "adamw, or lamb (Adam with a per-tensor trust ratio).",
                              choices=OPTIMIZERS)
    precision: str | None = _setting(None, "fp32, bf16 (autocast) or fp16 (autocast + "
                                     "gradient scaling).", shown="bf16 on CUDA, else fp32",
                                     choices=PRECISIONS)
    grad_accum: int = _setting(1, "Micro-batches per optimizer step.", min=1)
    clip: float = _setting(1.0, "Gradient-norm clipping (0: off).")
    freeze: tuple[str, ...] = _setting(
        (), "Parts of the model not trained: all, embeddings, encoder, layer:N, layers:A-B, "
        "pooler, head (comma-separated, or the flag repeated).", shown="none",
        metavar="PATTERN")
    stages: str | None = _setting(
        None, "Train in stages, 'PATTERNS@STEP;...;PATTERNS': each trains the parts it names "
        "through step STEP, the last to --max-steps; e.g. 'head@100;layers:4-5,head@300;all'.",
        shown="one stage", metavar="SPEC")
    layer_lr_decay: float = _setting(
        1.0, "Layer-wise lr decay X: head and pooler at --lr, layer i of L at lr*X^(L-i), the "
        "embeddings at lr*X^(L+1) (1: off).")
    save_every: int = _setting(200, "Checkpoint every this many steps (and at the end).", min=1)
    keep: int = _setting(3, "Checkpoints kept (the newest).", min=1)
    log_every: int = _setting(10, "A metrics.jsonl line every this many steps (and the first, "
                              "the last and eval steps).", min=1)
    eval_every: int | None = _setting(None, "Evaluate every this many steps.",
                                      shown="--save-every", min=1)
    seed: int = _setting(0, "Seeds the model, the data order, the masking and dropout.", min=0)
    threads: int | None = _setting(None, "Torch threads per process.",
                                   shown="the checkpoint's, else cores / processes", min=1)
    packed: bool | None = _setting(
        None, "Fine-tuning (classify, tag, regress): train on the batches' real tokens only, "
        "padding-free (the same loss up to rounding).", shown="on CUDA")
    checkpoint_activations: bool = _setting(
        False, "Recompute encoder layers in the backward pass (less memory).")
    mask_prob: float = _setting(0.15, "Fraction of the tokens masked for MLM, in (0, 1).")
    whole_word_mask: bool = _setting(False, "Mask whole words.")
    # --task qa: windows over long contexts, and how answers are read from the model
    doc_stride: int | None = _setting(
        None, "QA: context tokens that consecutive windows of a long context share.",
        shown="128, or half a window's context when --seq-len is short", min=0)
    max_query_length: int = _setting(64, "QA: questions are cut to this many tokens.", min=1)
    max_answer_length: int = _setting(30, "QA: the longest answer read, in tokens.", min=1)
    null_threshold: float = _setting(
        0.0, "QA, SQuAD v2.0: answer nothing when the null answer's score exceeds the best "
        "span's by more than this.")
    resume: bool = _setting(False, "Continue from the newest checkpoint in --out.")
    overwrite: bool = _setting(False, "Replace the run in --out, once the new one is complete "
                               "(other files there stay).")
    nproc: int = _setting(1, "Processes on this machine (launches torchrun; data parallel).",
                          min=1)
    progress: bool | None = _setting(None, "Show a progress bar (else a line per checkpoint).",
                                     shown="on a terminal")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = tuple(str(p) for p in self.data)
        self.eval_data = tuple(str(p) for p in self.eval_data)
        self.freeze = tuple(str(p) for p in self.freeze)
        _choice("--task", self.task, TASKS)
        kind = TASK_KINDS[self.task]
        if self.lr is None:
            self.lr = kind.lr
        if self.eval_every is None:
            self.eval_every = self.save_every
        if self.eval_split is None:
            embedded = kind.corpus and not self.data and not self.eval_data
            self.eval_split = 0.02 if embedded else 0.0
        if self.task == "qa" and self.doc_stride is None:
            self.doc_stride = min(128, max(0, self.seq_len - self.max_query_length - 3) // 2)
        self.validate()

    def validate(self) -> None:
        """Raise `BertrtError` naming the first invalid setting."""
        _choice("--task", self.task, TASKS)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        if self.precision is not None:  # None: the device's default (`for_device`)
            _choice("--precision", self.precision, PRECISIONS)
        for f in dataclasses.fields(self):
            if "min" in f.metadata and getattr(self, f.name) is not None:
                check_int(_flag(f.name), getattr(self, f.name), f.metadata["min"])
        if not self.lr > 0:  # type: ignore[operator]
            raise BertrtError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise BertrtError(f"--warmup is a fraction of --max-steps in [0, 1), "
                              f"got {self.warmup}")
        if self.weight_decay < 0:
            raise BertrtError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip < 0:
            raise BertrtError(f"--clip must be >= 0 (0 disables it), got {self.clip}")
        parse_patterns(self.freeze, "--freeze")  # what they match, the model decides
        if self.stages is not None:
            parse_stages(self.stages, self.max_steps)
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise BertrtError(f"--layer-lr-decay must be in (0, 1] (1: off), got "
                              f"{self.layer_lr_decay}")
        if not 0.0 <= self.eval_split < 0.5:  # type: ignore[operator]
            raise BertrtError(f"--eval-split is a fraction of the documents in [0, 0.5), "
                              f"got {self.eval_split}")
        if self.eval_split and self.eval_data:
            raise BertrtError("give --eval-data FILE or --eval-split F, not both")
        kind = TASK_KINDS[self.task]
        if self.eval_split and not kind.corpus:
            raise BertrtError(f"--eval-split holds out pre-training documents; --task "
                              f"{self.task} takes --eval-data")
        if not 0.0 < self.mask_prob < 1.0:
            raise BertrtError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        if self.model is not None and self.preset is not None:
            raise BertrtError("give --model DIR or --preset NAME, not both")
        if not kind.corpus and not self.data:
            raise BertrtError(f"--task {self.task} needs --data (a training file)")
        if self.task == "qa":
            from bertrt.serve.qa import check_settings

            check_settings(self.seq_len, self.doc_stride, self.max_query_length,  # type: ignore
                           self.max_answer_length, what="--")
        if self.resume and self.overwrite:
            raise BertrtError("--resume continues what is in --out; --overwrite replaces it: "
                              "give one of them")

    def for_device(self, cuda: bool) -> TrainConfig:
        """These settings with the device's defaults filled in: bf16 autocast on CUDA (fp32
        elsewhere) unless --precision is given, and packed fine-tuning on CUDA for the tasks
        that can train packed unless --packed/--no-packed is given. A run's trajectory and
        `run.json` hold the filled-in values."""
        packs = self.task in PACKED_TASKS
        if self.packed and not packs:
            raise BertrtError(f"--packed: --task {self.task} trains padded batches; packed "
                              f"training is for {', '.join(PACKED_TASKS)}")
        precision = self.precision or ("bf16" if cuda else "fp32")
        packed = (cuda and packs) if self.packed is None else self.packed
        if (precision, packed) == (self.precision, self.packed):
            return self
        return dataclasses.replace(self, precision=precision, packed=packed)

    # ------------------------------------------------------------------ derived
    @property
    def head(self) -> str:
        """The model head the task trains."""
        return TASK_KINDS[self.task].head

    def trajectory(self, world_size: int) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (JSON types only)."""
        values = {name: _jsonable(getattr(self, name)) for name in TRAJECTORY_FIELDS}
        for name, absent in _ABSENT.items():  # so checkpoints from before the flag match
            if values[name] == absent:
                del values[name]
        values["world_size"] = world_size
        return values

    def to_dict(self) -> dict[str, Any]:
        """All settings, JSON types only (for `run.json`)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "extra"}

    def to_argv(self, changed_only: bool = False) -> list[str]:
        """The `bertrt train` arguments that rebuild this config (for re-launching; without
        --nproc, the launcher's); with `changed_only`, only the settings that differ from
        what they would be without their flag (for a command shown to the user)."""
        # the CPU's defaults filled in: a CPU run's filled-in values are not changes
        base = TrainConfig(task=self.task, data=self.data, eval_data=self.eval_data,
                           save_every=self.save_every).for_device(False) if changed_only else None
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("extra", "nproc") or value is None:
                continue
            if base is not None and value == (getattr(base, f.name) if f.name not in _BASE
                                              else f.default):
                continue
            if isinstance(value, tuple):
                for path in value:
                    argv += [_flag(f.name), str(path)]
            elif isinstance(value, bool):
                if value or f.default is None:  # an on/off switch says both
                    argv.append(_flag(f.name) if value else "--no-" + _flag(f.name)[2:])
            else:
                argv += [_flag(f.name), str(value)]
        return argv


def config_hash(trajectory: dict[str, Any]) -> str:
    """A short stable digest of `trajectory`."""
    text = json.dumps(trajectory, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_run(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise `BertrtError` naming the first setting in which `current` differs from `saved`."""
    for name in sorted(set(saved) | set(current)):
        was, now = saved.get(name, _ABSENT.get(name)), current.get(name, _ABSENT.get(name))
        if was != now:
            flag = "the number of processes" if name == "world_size" else _flag(name)
            raise BertrtError(
                f"--resume: {where} was trained with {flag} {_show(was)}, this run "
                f"has {_show(now)}; resume with the same settings, or start a new --out"
            )


#: The fields `to_argv(changed_only=True)` keeps unless they have their own default.
_BASE = ("task", "data", "eval_data", "save_every")
#: Trajectory fields left out when they have this value (added after the first checkpoints).
_ABSENT: dict[str, Any] = {"eval_split": 0.0, "freeze": [], "stages": None,
                           "layer_lr_decay": 1.0, "doc_stride": None, "max_query_length": 64}


def check_int(what: str, value: Any, least: int,
              error: type[Exception] = BertrtError) -> int:
    """`value` as an int; `error` unless it is an integer (numpy's too, not a bool) >= `least`.

    The one integer check of the training settings and the data functions."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise error(f"{what} must be {kind}, got {value!r}")
    return int(value)


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BertrtError(f"{flag} {value!r} is unknown; expected one of {', '.join(choices)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "(none)"
    return "(none)" if value is None else str(value)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
