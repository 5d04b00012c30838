"""Setting up a training run, in the order `loop.train` calls these: torchrun's environment, what
the run starts from (a checkpoint, `--model`, or a preset) and the output folder, threads and
seeds, the training files, the tokenizer, the model, its torch module, the optimizer.

Resuming loads the checkpoint once (`start`): its training state, and a model whose config,
label ids and tokenizer the later steps take from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bertrt
from bertrt.config import BertConfig
from bertrt.errors import BertrtError
from bertrt.graph.ir import HEAD
from bertrt.model import Model
from bertrt.tokenizer import Tokenizer
from bertrt.train import checkpoint as ckpt
from bertrt.train import outdir, stages
from bertrt.train.config import TASK_KINDS, TrainConfig, check_same_run
from bertrt.train.optim import build_optimizer, build_scheduler, no_decay_names
from bertrt.train.outdir import DATA_DIR
from bertrt.train.report import Say
from bertrt.weights import match_tensors

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ====================================================================== processes
@dataclass(frozen=True)
class Dist:
    """Where this process sits: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, and its device."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place; returned for chaining)."""
        if self.enabled:
            moved = tensor.to(self.device)
            dist.all_reduce(moved)
            tensor.copy_(moved.to(tensor.device))
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        objs = [obj]
        dist.broadcast_object_list(objs, src=0)
        return objs[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.enabled:
            return [obj]
        objs: list[Any] = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs


def is_distributed_launch() -> bool:
    """True inside a process started by torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed() -> Dist:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); one process: none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, local_world, device)


def configure_device(env: Dist) -> None:
    """On CUDA, fp32 matrix products (and cuDNN's) run on TF32 tensor cores: 10 mantissa bits
    in the products, fp32 accumulation, about 8x the fp32 rate. The CPU is left as it is (its
    results stay bitwise those of earlier runs)."""
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ====================================================================== where the run starts
@dataclass
class Start:
    """What a run starts from: the checkpoint it resumes (its state and model), or `--model`'s
    model, or nothing but a preset's config; and where it writes."""

    step: int  #: the first step to run
    state: dict[str, Any] | None  #: the checkpoint's training state, when resuming
    model: Model | None  #: the checkpoint's model (resuming) or --model's
    config: BertConfig  #: the model's config, or the preset's
    where: str  #: names the source in messages
    out: Path  #: --out
    #: Where the run writes: OUT, or for --overwrite of a used OUT the folder beside it that
    #: replaces OUT once the run is complete (`outdir`).
    work: Path
    opened: bool = False  #: whether `work` has been made (`open_out`)

    @property
    def resumed(self) -> bool:
        return self.state is not None

    @property
    def replaces(self) -> bool:
        """An --overwrite run that builds beside OUT, and replaces it at the end."""
        return self.work != self.out

    @property
    def label2id(self) -> dict[str, int] | None:
        """The checkpoint's label ids (a resumed fine-tuning run keeps them), else None."""
        return self.config.extra.get("label2id") if self.resumed else None

    @property
    def best(self) -> float | None:
        return self.state.get("best") if self.state is not None else None

    def final(self, path: Path) -> Path:
        """`path`, a file the run wrote, as it is named once the run is OUT."""
        return self.out / path.relative_to(self.work) if path.is_relative_to(self.work) else path


def start(cfg: TrainConfig, out: Path, env: Dist) -> Start:
    """Check OUT and the settings, and load what the run starts from; every rank does this
    before rank 0 writes anything (but tidying what a stopped --overwrite left beside OUT)."""
    if env.master:
        outdir.recover_out(out)
    env.barrier()
    resume_from = _check_out(cfg, out)
    used = out.is_dir() and any(out.iterdir())
    work = outdir.staging_dir(out) if cfg.overwrite and used else out
    if resume_from is not None:
        step, folder = resume_from
        state = ckpt.load_state(folder)
        check_same_run(state["trajectory"], cfg.trajectory(env.world), str(folder))
        model = bertrt.load(folder, head=cfg.head)
        begin = Start(step, state, model, model.config, str(folder), out, work)
    elif cfg.model is not None:
        model = bertrt.load(cfg.model)
        begin = Start(0, None, model, model.config, str(cfg.model), out, work)
    else:
        name = cfg.preset or "tiny"
        begin = Start(0, None, None, BertConfig.preset(name), f"preset {name}", out, work)
    if begin.config.max_position_embeddings < cfg.seq_len:
        raise BertrtError(f"--seq-len {cfg.seq_len} exceeds max_position_embeddings="
                          f"{begin.config.max_position_embeddings} of {begin.where}")
    for path in (*cfg.data, *cfg.eval_data):
        if not Path(path).is_file():
            raise BertrtError(f"{path}: file not found")
    return begin


def open_out(begin: Start, env: Dist, vocab: Tokenizer | None = None) -> None:
    """Rank 0 makes the folder the run writes (`begin.work`) once everything the run reads has
    been checked, clearing what a killed run left there; and writes a freshly trained `vocab`
    into its data/. Every rank calls this."""
    if not begin.opened:
        env.barrier()  # every rank has checked OUT (`start`) before it changes
        if env.master:
            ckpt.remove_partial(begin.work)
            begin.work.mkdir(parents=True, exist_ok=True)
        begin.opened = True
    if vocab is not None and env.master:
        (begin.work / DATA_DIR).mkdir(exist_ok=True)
        vocab.save_vocab(begin.work / DATA_DIR / "vocab.txt")


def finish_out(begin: Start) -> None:
    """Rank 0, at the end of a run that replaces OUT: the new run becomes OUT."""
    if begin.replaces:
        outdir.replace_out(begin.work, begin.out)


def discard_out(begin: Start) -> None:
    """Rank 0, when a run that replaces OUT fails: its half-built folder goes, OUT stays (or,
    failing during the exchange itself, is made whole: `outdir.recover_out`)."""
    if begin.replaces:
        with contextlib.suppress(OSError):  # what is left, the next run tidies
            outdir.recover_out(begin.out)


def _check_out(cfg: TrainConfig, out: Path) -> tuple[int, Path] | None:
    """Refuse a used OUT unless --resume/--overwrite; with --resume, its newest checkpoint."""
    if out.exists() and not out.is_dir():
        raise BertrtError(f"--out {out}: exists and is not a directory")
    if cfg.resume:
        return ckpt.latest_checkpoint(out)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise BertrtError(f"--out {out}: not empty; continue it with --resume, replace it "
                          f"with --overwrite, or choose another --out")
    return None


# ====================================================================== threads and seeds
def threads(cfg: TrainConfig, env: Dist, state: dict[str, Any] | None, say: Say) -> int:
    """--threads, else the checkpoint's, else the cores shared among this machine's ranks."""
    saved = state.get("threads") if state else None
    if cfg.threads is not None:
        if saved is not None and saved != cfg.threads:
            say(f"notice: the checkpoint ran with --threads {saved}; with {cfg.threads} the "
                f"result is not bitwise equal to an uninterrupted run")
        return cfg.threads
    if saved is not None:
        return int(saved)
    return max(1, (os.cpu_count() or 1) // max(env.local_world, 1))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ====================================================================== data and tokenizer
def data_paths(cfg: TrainConfig, begin: Start, env: Dist, say: Say) -> list[Path]:
    """The training files; for pretraining without --data, the embedded corpus in OUT/data
    (there is nothing of the user's to check first, so this opens OUT)."""
    if cfg.data:
        return [Path(p) for p in cfg.data]
    from bertrt.train.corpus import embedded_corpus

    open_out(begin, env)
    corpus = begin.work / DATA_DIR / "corpus.txt"
    if env.master and not corpus.is_file():
        say("building the embedded corpus (docstrings of the Python standard library)...")
        corpus = embedded_corpus(begin.work / DATA_DIR)
    env.barrier()
    return [corpus]


def choose_tokenizer(cfg: TrainConfig, env: Dist, begin: Start, paths: list[Path],
                     train_vocab: Callable[[list[Path], int], Tokenizer],
                     say: Say) -> tuple[Tokenizer, bool]:
    """The checkpoint's, --vocab, the --model's, or one `train_vocab` makes from the data (on
    rank 0, for every rank); and whether it was trained (`open_out` then saves it)."""
    if begin.resumed:
        return begin.model.tokenizer, False  # type: ignore[union-attr]
    if cfg.vocab is not None:
        return Tokenizer.from_vocab(cfg.vocab), False
    if begin.model is not None and begin.model.has_tokenizer:
        return begin.model.tokenizer, False
    vocab = None
    if env.master:
        say(f"training a {cfg.vocab_size}-token WordPiece vocabulary on "
            f"{', '.join(map(str, paths))}...")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vocab = train_vocab(paths, cfg.vocab_size).vocab
        for warning in caught:  # a small corpus, words too long to split: one line each
            say(f"warning: {warning.message}")
    return Tokenizer(env.broadcast(vocab)), True


# ====================================================================== model and optimizer
def build_model(cfg: TrainConfig, tokenizer: Tokenizer, labels: list[str] | None,
                begin: Start, say: Say) -> Model:
    """The checkpoint's model, or a fresh one (--preset), or --model's weights in a model with
    the task's head (weights it lacks initialised fresh, with a notice naming them)."""
    if begin.resumed:
        return begin.model  # type: ignore[return-value]
    base = begin.model
    if base is not None:
        config = base.config
    else:
        config = BertConfig.preset(cfg.preset or "tiny", vocab_size=tokenizer.vocab_size)
    if labels is not None:
        config = config.with_labels(labels)
    problem_type = TASK_KINDS[cfg.task].problem_type
    if problem_type is not None:  # Hugging Face's key: a one-output head that regresses
        config = dataclasses.replace(config, extra={**config.extra, "problem_type": problem_type})
    fresh = Model.from_config(config, head=cfg.head, seed=cfg.seed, tokenizer=tokenizer)
    if base is not None:
        _copy_weights(base, fresh, begin.where, say)
        fresh.carried = base.carried  # --model's other files go with it (`bertrt.modeldir`)
    return fresh


def _copy_weights(base: Model, model: Model, where: str, say: Say) -> None:
    """Copy `base`'s weights into `model`, names mapped by `match_tensors`; the head's only when
    it is the same head with the same labels."""
    same_head = base.head == model.head and base.config.id2label == model.config.id2label
    graph = base.graph
    tensors = base.weights if same_head else {
        name: t for name, t in base.weights.items() if graph.scope_of(graph.params[name]) != HEAD}
    found = match_tensors(model.graph, tensors, where)
    with torch.no_grad():
        for name, tensor in found.matched.items():
            model.weights[name].copy_(tensor)
    if found.missing:
        say(f"notice: {where} has no weights for {', '.join(found.missing)}; initialised "
            f"fresh for the {model.head} head")


@dataclass
class Lowered:
    """The model's torch modules on this rank's device, all over the model's one set of
    weights: `net` (padded; evaluation and the stages work on it), `stepper` (what the
    training steps run: `net`, or with --packed its packed form) and `module` (`wrap`'s of
    `stepper`)."""

    net: torch.nn.Module
    stepper: torch.nn.Module
    module: torch.nn.Module


def lower(model: Model, cfg: TrainConfig, env: Dist,
          trainable: Collection[str] | None = None) -> Lowered:
    """The model's torch modules on this rank's device (see `Lowered`). The model's weights
    move there first (`Model.to`), so the modules, the optimizer and `model.save()` share
    one set of tensors. With --checkpoint-activations each encoder layer is recomputed in
    the backward pass instead of kept (memory for compute). Only the parameters named in
    `trainable` (all when None) take gradients (`stages.apply`)."""
    model.to(env.device)
    nets = [model.to_torch(checkpoint_layers=cfg.checkpoint_activations)]
    if cfg.packed:
        nets.append(model.to_torch(packed=True, checkpoint_layers=cfg.checkpoint_activations))
    for net in nets:
        net.check_inputs = False  # ids come from our own collate; skip a reduction per call
        net.train()
    if trainable is not None:
        stages.apply(nets[0], trainable)  # the modules share their Parameters
    return Lowered(nets[0], nets[-1], wrap(nets[-1], env))


def wrap(net: torch.nn.Module, env: Dist) -> torch.nn.Module:
    """The module the step calls: DDP's wrapper of `net` with several processes, else `net`.
    DDP reduces the gradients of the parameters that train when it is built: a stage that
    changes them builds it anew."""
    if not env.enabled:
        return net
    ids = [env.local_rank] if env.device.type == "cuda" else None
    return DDP(net, device_ids=ids)


@dataclass
class Optimization:
    """The optimizer, its schedule, fp16's GradScaler, the autocast context and the trained
    parameters."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Any
    params: list[torch.nn.Parameter]


def optimization(cfg: TrainConfig, model: Model, net: torch.nn.Module, env: Dist,
                 state: dict[str, Any] | None, say: Say) -> Optimization:
    """Build the optimizer (no weight decay where the model's graph says so), schedule and
    scaler; resuming, restore their states and this rank's RNG from the checkpoint."""
    if cfg.precision == "fp16" and env.device.type == "cpu":
        say("warning: --precision fp16 on the CPU is several times slower than fp32 (CPUs "
            "have no fast fp16 arithmetic); use --precision bf16 for mixed precision on a CPU")
    scales = (stages.lr_scales(model.graph, cfg.layer_lr_decay) if cfg.layer_lr_decay != 1.0
              else None)
    optimizer = build_optimizer(net.named_parameters(), cfg.optimizer, cfg.lr,  # type: ignore
                                cfg.weight_decay, no_decay_names(model.graph), scales)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.warmup, cfg.max_steps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    autocast = torch.autocast(env.device.type, dtype=AUTOCAST.get(cfg.precision),
                              enabled=cfg.precision != "fp32")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"][env.rank])
    # every parameter: a frozen one has no gradient, which clipping and the optimizer skip
    return Optimization(optimizer, scheduler, scaler, autocast, list(net.parameters()))
