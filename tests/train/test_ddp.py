"""Data parallelism: 2 processes (gloo, launched by `bertrt train --nproc 2` through torchrun)
at per-process batch b compute the same steps as 1 process at batch 2b (dropout 0); so does
gradient accumulation. Checkpoints of a 2-process run hold both ranks' RNG states and resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bertrt.train.checkpoint import STATE_FILE, list_checkpoints
from bertrt.train.cli import train

ROOT = Path(__file__).resolve().parents[2]
STEPS = 5


@pytest.fixture(scope="module")
def world(word_tokenizer, save_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    rng = random.Random(2)
    words = ("north south east west over under inside outside quick slow bright dark loud "
             "quiet warm cold early late").split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(
        "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + " ."
                  for _ in range(rng.randint(2, 5))) for _ in range(150)) + "\n")
    save_model(word_tokenizer(corpus), root / "model", dropout=0.0)
    args = ["--data", str(corpus), "--model", str(root / "model"), "--seq-len", "32",
            "--max-steps", str(STEPS), "--log-every", "1", "--save-every", "2", "--lr", "3e-3",
            "--threads", "1"]
    return {"root": root, "args": args}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_process(world: dict, out: Path, *extra: str) -> list[dict]:
    result = CliRunner().invoke(train, [*world["args"], "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return rows(out)


def assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in ("loss", "mlm_loss", "nsp_loss"):
            assert abs(x[key] - y[key]) < 1e-5, (x["step"], key, x[key], y[key])
        for key in ("mlm_acc", "nsp_acc", "lr"):
            assert x[key] == y[key], (x["step"], key)


def test_two_processes_at_b_equal_one_process_at_2b(world, tmp_path: Path) -> None:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "bertrt.train.cli", *world["args"],
                           "--batch-size", "4", "--nproc", "2", "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x batch 4" in proc.stderr
    single = one_process(world, tmp_path / "one", "--batch-size", "8")
    assert_same_steps(single, rows(two))
    # rank 0 wrote the checkpoints, holding both ranks' RNG states
    step, folder = list_checkpoints(two)[-1]
    state = torch.load(folder / STATE_FILE, weights_only=True)
    assert step == STEPS and state["world_size"] == 2 and len(state["rng"]) == 2
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    # resuming with another number of processes is refused, naming it
    again = CliRunner().invoke(train, [*world["args"], "--batch-size", "4", "--out", str(two),
                                       "--resume"])
    assert again.exit_code == 2 and "the number of processes 2, this run has 1" in again.output


def test_gradient_accumulation_equals_the_larger_batch(world, tmp_path: Path) -> None:
    accumulated = one_process(world, tmp_path / "accum", "--batch-size", "4",
                              "--grad-accum", "2")
    single = one_process(world, tmp_path / "one", "--batch-size", "8")
    assert_same_steps(single, accumulated)
