"""Staged fine-tuning: `--freeze` and `--stages` train only the parts of the model they name
(chosen by the IR's scopes), frozen parameters stay bitwise unchanged and hold no optimizer
state, a run stopped in one stage and resumed across a boundary ends bitwise equal to one never
stopped; `--layer-lr-decay` gives each depth its learning rate; mistakes are one line."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import bertrt
from bertrt.errors import BertrtError
from bertrt.train import loop, stages
from bertrt.train.checkpoint import STATE_FILE
from bertrt.train.cli import train
from bertrt.train.config import TrainConfig
from bertrt.train.optim import build_optimizer, no_decay_names

WORDS = "apple pear plum stone brick sand river cloud tree road".split()
STEPS = 9
#: head for 3 steps; then layer 1 alone (the head frozen again) to step 6; then all but the
#: embeddings, which --freeze keeps for the whole run.
STAGES = "head@3;layer:1@6;all"


def write_tsv(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["text\tlabel"]
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        lines.append(f"{' '.join(words)}\t{'yes' if 'apple' in words[:2] else 'no'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def world(word_tokenizer, save_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stages")
    data = write_tsv(root / "train.tsv", 64, seed=0)
    vocab = root / "words.txt"
    vocab.write_text(" ".join(WORDS) + "\n")
    model = save_model(word_tokenizer(vocab), root / "model", dropout=0.1)  # RNG state matters
    args = ["--task", "classify", "--data", str(data), "--model", str(model), "--batch-size",
            "4", "--seq-len", "16", "--max-steps", str(STEPS), "--save-every", "3", "--keep",
            "5", "--log-every", "1", "--threads", "1", "--lr", "5e-3", "--freeze",
            "embeddings", "--stages", STAGES]
    straight = root / "straight"
    result = CliRunner().invoke(train, [*args, "--out", str(straight)])
    assert result.exit_code == 0, result.output
    return {"root": root, "args": args, "straight": straight, "output": result.output}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def part(name: str) -> str:
    """The part a parameter belongs to, by its Hugging Face name: an independent reading of
    what the IR's scopes say (the code under test never parses names)."""
    if name.startswith("bert.embeddings."):
        return "embeddings"
    if name.startswith("bert.encoder.layer."):
        return "layer" + name.split(".")[3]
    return "pooler" if name.startswith("bert.pooler.") else "head"


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The parts with any parameter that is not bitwise equal."""
    return {part(n) for n in after if n in before and not torch.equal(before[n], after[n])}


def initial(world: dict) -> dict[str, torch.Tensor]:
    """The weights the run starts from: --model's, and the fresh head it draws from --seed."""
    base = bertrt.load(world["root"] / "model")
    fresh = bertrt.Model.from_config(base.config.with_labels(["no", "yes"]),
                                     head="classification", seed=0)
    return {**weights(world["root"] / "model"),
            **{n: t for n, t in fresh.weights.items() if part(n) == "head"}}


def test_frozen_parts_stay_bitwise_and_hold_no_optimizer_state(world) -> None:
    base = initial(world)
    ckpts = world["straight"] / "checkpoints"
    at3, at6, end = (weights(ckpts / f"step-{s}") for s in (3, 6, 9))
    assert changed(base, at3) == {"head"}
    assert changed(at3, at6) == {"layer1"}  # the head frozen again: unchanged in stage 2
    assert changed(at6, end) == {"layer0", "layer1", "pooler", "head"}
    assert changed(base, end) == {"layer0", "layer1", "pooler", "head"}  # never embeddings

    shapes = {part_name: {tuple(t.shape) for n, t in end.items() if part(n) == part_name}
              for part_name in ("head", "layer1")}
    for step, trained in ((3, "head"), (6, "layer1")):
        state = torch.load(ckpts / f"step-{step}" / STATE_FILE, weights_only=True)
        kept = state["optimizer"]["state"]
        n_trained = sum(1 for n in end if part(n) == trained)
        assert len(kept) == n_trained, step  # only the parameters that train have state
        assert {tuple(s["exp_avg"].shape) for s in kept.values()} == shapes[trained]
        assert all(float(s["step"]) == 3 for s in kept.values())  # 3 steps in either stage
        assert state["stage"] == (1 if step == 3 else 2)
    assert "stage 2/3 (layer:1@6), from step 4: training 16 of 41" in world["output"]
    assert "stage 3/3 (all), from step 7:" in world["output"]


class _Stopped(Exception):
    pass


@pytest.mark.parametrize("stop", [5, 7], ids=["inside-stage-2", "at-a-boundary"])
def test_resume_across_a_stage_boundary_is_bitwise_exact(world, tmp_path: Path,
                                                         stop: int) -> None:
    """Stopped at step 5, the run resumes from step 3 (the end of stage 1) and crosses two
    boundaries; stopped at 7, from step 6 (the end of stage 2, whose optimizer state has no
    head: the head rejoins fresh)."""
    out = tmp_path / "out"

    def stop_there(done: int) -> None:
        if done == stop:
            raise _Stopped

    args = [*world["args"], "--out", str(out)]
    settings = train.make_context("train", list(args)).params  # (click consumes the list)
    with pytest.raises(_Stopped):
        loop.train(TrainConfig(**settings), on_step=stop_there)
    result = CliRunner().invoke(train, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    straight, resumed = weights(world["straight"]), weights(out)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_patterns_choose_parameters_by_scope() -> None:
    config = bertrt.BertConfig(vocab_size=30, hidden_size=16, num_attention_heads=2,
                               num_hidden_layers=4, intermediate_size=32)
    graph = bertrt.Model.from_config(config, head="classification").graph

    def parts(*texts: str) -> set[str]:
        chosen = stages.select(graph, stages.parse_patterns(texts, "--freeze"), "--freeze")
        return {part(n) for n in chosen}

    assert parts("embeddings") == {"embeddings"}
    assert parts("layers:1-2") == {"layer1", "layer2"}
    assert parts("layer:3", "pooler,head") == {"layer3", "pooler", "head"}
    assert parts("encoder") == {f"layer{i}" for i in range(4)}
    assert len(stages.select(graph, stages.parse_patterns(["all"], "x"), "x")) == len(
        graph.params)
    tagger = bertrt.Model.from_config(config, head="token-classification").graph
    with pytest.raises(BertrtError, match=r"'pooler' matches no parameter of this model \(it "
                                          r"has embeddings, head, layers 0-3\)"):
        stages.select(tagger, stages.parse_patterns(["pooler"], "--freeze"), "--freeze")
    with pytest.raises(BertrtError, match="'layers:2-4' matches no parameter"):
        stages.select(graph, stages.parse_patterns(["layers:2-4"], "--freeze"), "--freeze")


def test_layer_lr_decay_gives_each_depth_its_rate() -> None:
    config = bertrt.BertConfig(vocab_size=30, hidden_size=16, num_attention_heads=2,
                               num_hidden_layers=3, intermediate_size=32)
    model = bertrt.Model.from_config(config, head="classification")
    net = model.to_torch()
    decay, lr = 0.5, 1e-3
    opt = build_optimizer(net.named_parameters(), "adamw", lr, 0.01,
                          no_decay_names(model.graph), stages.lr_scales(model.graph, decay))
    names = {id(p): n for n, p in net.named_parameters()}
    rate = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    expected = {"head": lr, "pooler": lr, "layer2": lr * decay, "layer1": lr * decay**2,
                "layer0": lr * decay**3, "embeddings": lr * decay**4}
    assert len(rate) == len(names)
    for name, value in rate.items():
        assert value == pytest.approx(expected[part(name)]), name
    assert opt.param_groups[0]["lr"] == lr  # the logged lr is the head's


@pytest.mark.parametrize(("extra", "message"), [
    (["--freeze", "layers:0-7"], "error: --freeze: 'layers:0-7' matches no parameter of this "
                                 "model (it has embeddings, head, pooler, layers 0-1)"),
    (["--freeze", "embedings"], "error: --freeze: 'embedings' is not a pattern; expected one of "
                                "all, embeddings, encoder, layer:N, layers:A-B, pooler, head"),
    (["--freeze", "layers:3-1"], "error: --freeze: 'layers:3-1': the range runs backwards"),
    (["--stages", "head;all"], "error: --stages: stage 1 'head' has no @STEP"),
    (["--stages", "head@5;all@2"], "error: --stages: the last stage 'all@2' runs to "
                                   "--max-steps 9"),
    (["--stages", "head@6;pooler@4;all"], "error: --stages: stage 2 'pooler@4' ends at step 4; "
                                          "the steps must increase"),
    (["--stages", "head@x;all"], "error: --stages: stage 1 'head@x': expected PATTERN,...@STEP"),
    (["--stages", "@3;all"], "error: --stages: stage 1 '@3' names no part of the model"),
    (["--freeze", "head", "--stages", "head@3;all"], "error: --stages stage 1: nothing left to "
                                                     "train once --freeze head is applied"),
    (["--layer-lr-decay", "1.5"], "error: --layer-lr-decay must be in (0, 1]"),
])
def test_bad_patterns_and_stages_are_one_line(world, tmp_path: Path, extra: list[str],
                                              message: str) -> None:
    args = list(world["args"])
    at = args.index("--freeze")
    del args[at:at + 4]  # the world's --freeze and --stages
    out = tmp_path / "out"
    result = CliRunner().invoke(train, [*args, *extra, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(message), lines
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not out.exists()  # checked before anything was written


def test_stage_settings_round_trip_through_argv() -> None:
    """What `--nproc` hands to torchrun and what Ctrl-C prints rebuild the same settings."""
    cfg = TrainConfig(task="classify", data=("a.csv",), freeze=("embeddings", "layer:0"),
                      stages="head@3;all", layer_lr_decay=0.9, max_steps=9)
    for argv in (cfg.to_argv(), cfg.to_argv(changed_only=True)):
        assert argv.count("--freeze") == 2
        assert TrainConfig(**train.make_context("train", argv).params).to_dict() == (
            cfg.to_dict())
    assert cfg.trajectory(1)["freeze"] == ["embeddings", "layer:0"]
    # runs from before these flags resume: their absence reads as the defaults
    assert not {"freeze", "stages", "layer_lr_decay"} & set(TrainConfig(
        task="classify", data=("a.csv",)).trajectory(1))
