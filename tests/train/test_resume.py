"""Checkpoints and exact resume: a run stopped at step k (in-process by an exception, or a
subprocess killing itself with SIGKILL, both from `loop.train`'s `on_step` callback) and resumed
ends with the same parameters, bit for bit, as one that was never interrupted; metrics.jsonl
keeps one line per step; a checkpoint of another configuration is refused, naming the
setting."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import bertrt
from bertrt.train import loop
from bertrt.train.checkpoint import STATE_FILE, list_checkpoints
from bertrt.train.cli import train
from bertrt.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


def write_corpus(path: Path, docs: int = 200) -> Path:
    rng = random.Random(1)
    words = ("alpha beta gamma delta river stone cloud light tree house road city field "
             "garden window door music paper glass water fire wind snow").split()
    path.write_text("\n\n".join(
        "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + " ."
                  for _ in range(rng.randint(2, 6))) for _ in range(docs)) + "\n")
    return path


@pytest.fixture(scope="module")
def world(word_tokenizer, save_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(root / "corpus.txt")
    save_model(word_tokenizer(corpus), root / "model", dropout=0.1)  # the RNG state matters
    args = ["--data", str(corpus), "--model", str(root / "model"), "--batch-size", "6",
            "--seq-len", "32", "--max-steps", str(STEPS), "--save-every", "4", "--keep", "2",
            "--log-every", "1", "--threads", "1", "--lr", "2e-3", "--grad-accum", "2"]
    straight = root / "straight"
    result = CliRunner().invoke(train, [*args, "--out", str(straight)])
    assert result.exit_code == 0, result.output
    return {"root": root, "args": args, "straight": straight}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: Path, b: Path) -> None:
    ra, rb = metric_rows(a), metric_rows(b)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))  # no duplicate, none missing
    for x, y in zip(ra, rb):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"], x["step"]


def config(args: list[str]) -> TrainConfig:
    """The settings `bertrt train ARGS` runs with."""
    return TrainConfig(**train.make_context("train", list(args)).params)


class _Stopped(Exception):
    pass


def test_stop_and_resume_is_bitwise_exact(world, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def stop_at_7(done: int) -> None:
        if done == 7:
            raise _Stopped

    with pytest.raises(_Stopped):
        loop.train(config([*world["args"], "--out", str(out)]), on_step=stop_at_7)
    assert [s for s, _ in list_checkpoints(out)] == [4]
    assert max(r["step"] for r in metric_rows(out)) == 6  # step 7 died before its log line

    refused = CliRunner().invoke(train, [*world["args"], "--out", str(out)])
    assert refused.exit_code == 2 and "not empty" in refused.output
    result = CliRunner().invoke(train, [*world["args"], "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resuming from step 4 (checkpoint {out / 'checkpoints' / 'step-4'})" in result.output
    assert_bitwise_equal(world["straight"], out)
    assert_same_metrics(world["straight"], out)
    assert [s for s, _ in list_checkpoints(out)] == [8, 12]  # --keep 2


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_continue(world, tmp_path: Path,
                                                               capsys, monkeypatch) -> None:
    out = tmp_path / "out"

    def interrupt_at_6(done: int) -> None:
        if done == 6:
            raise KeyboardInterrupt

    cfg = config([*world["args"], "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, on_step=interrupt_at_6)
    said = capsys.readouterr().err.strip().splitlines()[-2:]
    assert said[0] == (f"interrupted at step 6; the last checkpoint is "
                       f"{out / 'checkpoints' / 'step-4'} (step 4)"), said
    assert said[1].startswith("continue with: bertrt train ") and said[1].endswith(" --resume")
    again = config(said[1].removeprefix("continue with: bertrt train ").split())
    assert again.trajectory(1) == cfg.trajectory(1) and again.out == str(out)

    def ctrl_c(*args) -> None:
        raise KeyboardInterrupt

    # the command says so too, and exits as an interrupted program does (not "Aborted!")
    monkeypatch.setattr(loop, "_step", ctrl_c)
    result = CliRunner().invoke(train, [*world["args"], "--out", str(tmp_path / "o2")])
    assert result.exit_code == 130 and "Aborted!" not in result.output, result.output
    assert "interrupted at step 0; no checkpoint was written yet" in result.output


#: `python -c KILL_AT N ARGS...`: `bertrt train ARGS` that SIGKILLs itself after step N.
KILL_AT = textwrap.dedent("""
    import os, signal, sys
    from bertrt.train import loop
    from bertrt.train.cli import train
    from bertrt.train.config import TrainConfig

    def on_step(done):
        if done == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)

    loop.train(TrainConfig(**train.make_context("train", sys.argv[2:]).params), on_step)
""")


def test_sigkill_mid_run_then_resume_is_bitwise_exact(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", KILL_AT, "10", *world["args"],
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(out)] == [4, 8]
    assert max(r["step"] for r in metric_rows(out)) == 9
    # A half-written checkpoint folder, as a kill during a save leaves it, is ignored.
    partial = out / "checkpoints" / ".tmp-step-12-999"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    result = CliRunner().invoke(train, [*world["args"], "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert not partial.exists()
    assert_bitwise_equal(world["straight"], out)
    assert_same_metrics(world["straight"], out)


def test_checkpoints_are_model_dirs_with_a_weights_only_state(world) -> None:
    straight = world["straight"]
    found = list_checkpoints(straight)
    assert [s for s, _ in found] == [8, 12]
    step, folder = found[-1]
    model = bertrt.load(folder)
    assert model.head == "pretraining" and model.has_tokenizer
    state = torch.load(folder / STATE_FILE, weights_only=True)
    assert state["step"] == step and state["world_size"] == 1 and state["threads"] == 1
    assert state["data"]["examples_seen"] == step * 6 * 2
    assert len(state["rng"]) == 1 and "torch" in state["rng"][0]
    assert {"optimizer", "scheduler", "scaler", "trajectory", "config_hash"} <= state.keys()
    # the final checkpoint holds the same weights as OUT, and transformers reads them
    assert_bitwise_equal(folder, straight)
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertForPreTraining.from_pretrained(straight)
    torch.testing.assert_close(hf.bert.embeddings.word_embeddings.weight.detach(),
                               weights(straight)["bert.embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("flag,value,shown", [
    ("--lr", "1e-3", "--lr 0.002"),
    ("--seq-len", "48", "--seq-len 32"),
    ("--seed", "3", "--seed 0"),
])
def test_resume_with_another_config_names_the_setting(world, tmp_path: Path, flag: str,
                                                      value: str, shown: str) -> None:
    args = list(world["args"])
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    out = tmp_path / "out"
    shutil.copytree(world["straight"], out)
    result = CliRunner().invoke(train, [*args, "--out", str(out), "--resume"])
    assert result.exit_code == 2
    assert f"was trained with {shown}, this run has" in result.output, result.output
    assert_bitwise_equal(world["straight"], out)  # nothing touched


def test_resume_of_a_finished_run_changes_nothing(world, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(world["straight"], out)
    result = CliRunner().invoke(train, [*world["args"], "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert f"{out}: the run is finished ({STEPS} of {STEPS} steps)" in result.output
    assert "done: " not in result.output
    assert_bitwise_equal(world["straight"], out)
    assert [r["step"] for r in metric_rows(out)] == list(range(1, STEPS + 1))
