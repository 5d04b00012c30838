"""`TrainConfig`: every setting of a training run, typed, filled by the `bertrt train` command.

A run is a pure function of the fields in `TRAJECTORY_FIELDS` (plus the world size): two runs
that agree on them compute the same parameters. `--resume` checks them against the checkpoint's
and names the first that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from bertrt.errors import BertrtError

TASKS = ("pretrain", "classify", "tag")
#: The model head each task trains.
TASK_HEADS = {"pretrain": "pretraining", "classify": "classification",
              "tag": "token-classification"}
#: The eval metric that picks the best checkpoint of a fine-tuning run.
BEST_METRIC = {"classify": "macro_f1", "tag": "f1"}
SCHEDULES = ("linear", "poly")
OPTIMIZERS = ("adamw", "lamb")
PRECISIONS = ("fp32", "bf16", "fp16")

#: Fields that decide what a run computes; a resumed run must agree on every one of them.
TRAJECTORY_FIELDS = (
    "task", "data", "eval_data", "eval_split", "model", "preset", "vocab", "vocab_size",
    "batch_size", "seq_len", "max_steps", "lr", "weight_decay", "warmup", "schedule",
    "optimizer", "precision", "grad_accum", "clip", "seed", "mask_prob", "whole_word_mask",
)


@dataclass
class TrainConfig:
    """Settings of `bertrt train` (the CLI flags, one field each).

    Args:
        task: pretrain (MLM + NSP), classify (sequence classification) or tag (token tagging).
        data: Training files; none for `pretrain` means the embedded stdlib-docstrings corpus.
        eval_data: Held-out files evaluated every `eval_every` steps.
        eval_split: Pretrain: the fraction of the corpus's documents held out (chosen from
            `seed`) and evaluated instead of `eval_data`; default 0.02 for the embedded corpus
            (no `data`, no `eval_data`), else 0.
        model: A Hugging Face-layout BERT dir to start from (missing heads start fresh).
        preset: A fresh model of this size (default `tiny` when no `model` is given).
        vocab: A `vocab.txt`; default the model's, else one trained on the data.
        vocab_size: Size of a freshly trained vocabulary.
        out: The output dir: checkpoints, metrics, and at the end the final model.
        batch_size: Examples per micro-batch, per process.
        seq_len: Longest sequence in tokens (specials included).
        max_steps: Optimizer steps.
        lr: Peak learning rate (default 1e-3 for pretrain, 1e-4 for fine-tuning).
        weight_decay: Decoupled weight decay (none on biases and LayerNorm weights).
        warmup: Linear warm-up, as a fraction of `max_steps`.
        schedule: Decay after warm-up: linear, or poly (quadratic) to zero.
        optimizer: adamw or lamb.
        precision: fp32, bf16 (autocast) or fp16 (autocast + gradient scaling).
        grad_accum: Micro-batches per optimizer step.
        clip: Max global gradient norm (0 disables clipping).
        save_every: Checkpoint every this many steps (and at the end).
        keep: Checkpoints kept (the newest).
        log_every: Log to `metrics.jsonl` every this many steps (and the first and last).
        eval_every: Evaluate every this many steps (default `save_every`), with `eval_data`.
        seed: Seeds the model, the data order, the masking and dropout.
        threads: Torch intra-op threads per process (default: the checkpoint's, else all
            cores divided among local processes).
        checkpoint_activations: Recompute each encoder layer in the backward pass.
        mask_prob: Fraction of tokens masked for MLM.
        whole_word_mask: Mask all pieces of a word together.
        resume: Continue from the newest complete checkpoint in `out`.
        overwrite: Replace what an earlier run wrote in `out`.
        nproc: Processes to launch through torchrun (data parallel).
    """

    task: str = "pretrain"
    data: tuple[str, ...] = ()
    eval_data: tuple[str, ...] = ()
    eval_split: float | None = None
    model: str | None = None
    preset: str | None = None
    vocab: str | None = None
    vocab_size: int = 8000
    out: str = "bertrt-out"
    batch_size: int = 32
    seq_len: int = 128
    max_steps: int = 800
    lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    schedule: str = "linear"
    optimizer: str = "adamw"
    precision: str = "fp32"
    grad_accum: int = 1
    clip: float = 1.0
    save_every: int = 200
    keep: int = 3
    log_every: int = 10
    eval_every: int | None = None
    seed: int = 0
    threads: int | None = None
    checkpoint_activations: bool = False
    mask_prob: float = 0.15
    whole_word_mask: bool = False
    resume: bool = False
    overwrite: bool = False
    nproc: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = tuple(str(p) for p in self.data)
        self.eval_data = tuple(str(p) for p in self.eval_data)
        if self.lr is None:
            self.lr = 1e-3 if self.task == "pretrain" else 1e-4
        if self.eval_every is None:
            self.eval_every = self.save_every
        if self.eval_split is None:
            embedded = self.task == "pretrain" and not self.data and not self.eval_data
            self.eval_split = 0.02 if embedded else 0.0
        self.validate()

    def validate(self) -> None:
        """Raise `BertrtError` naming the first invalid setting."""
        _choice("--task", self.task, TASKS)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--precision", self.precision, PRECISIONS)
        for name in ("batch_size", "seq_len", "max_steps", "grad_accum", "save_every", "keep",
                     "log_every", "eval_every", "nproc", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BertrtError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.threads is not None and self.threads < 1:
            raise BertrtError(f"--threads must be a positive integer, got {self.threads}")
        if self.seq_len < 8:
            raise BertrtError(f"--seq-len must be at least 8, got {self.seq_len}")
        if not self.lr > 0:  # type: ignore[operator]
            raise BertrtError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise BertrtError(f"--warmup is a fraction of --max-steps in [0, 1), "
                              f"got {self.warmup}")
        if self.weight_decay < 0:
            raise BertrtError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip < 0:
            raise BertrtError(f"--clip must be >= 0 (0 disables it), got {self.clip}")
        if not 0.0 <= self.eval_split < 0.5:  # type: ignore[operator]
            raise BertrtError(f"--eval-split is a fraction of the documents in [0, 0.5), "
                              f"got {self.eval_split}")
        if self.eval_split and self.eval_data:
            raise BertrtError("give --eval-data FILE or --eval-split F, not both")
        if self.eval_split and self.task != "pretrain":
            raise BertrtError(f"--eval-split holds out pre-training documents; --task "
                              f"{self.task} takes --eval-data")
        if not 0.0 < self.mask_prob < 1.0:
            raise BertrtError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        if self.model is not None and self.preset is not None:
            raise BertrtError("give --model DIR or --preset NAME, not both")
        if self.task != "pretrain" and not self.data:
            raise BertrtError(f"--task {self.task} needs --data (a training file)")
        if self.resume and self.overwrite:
            raise BertrtError("--resume continues what is in --out; --overwrite replaces it: "
                              "give one of them")

    # ------------------------------------------------------------------ derived
    @property
    def head(self) -> str:
        """The model head the task trains."""
        return TASK_HEADS[self.task]

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

    def to_argv(self) -> list[str]:
        """The `bertrt train` arguments that rebuild this config (for re-launching)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("extra", "nproc") or value is None:
                continue
            if f.name in ("data", "eval_data"):
                for path in value:
                    argv += [_flag(f.name), str(path)]
            elif isinstance(value, bool):
                if value:
                    argv.append(_flag(f.name))
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


#: Trajectory fields left out when they have this value (added after the first checkpoints).
_ABSENT: dict[str, Any] = {"eval_split": 0.0}


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
