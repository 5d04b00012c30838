"""What `bertrt train` does differently on CUDA, checked on the CPU wherever it can be, so that
the CUDA path is right by construction; and on CUDA itself where a GPU is.

* packed (padding-free) fine-tuning: the loss and every gradient equal the padded batch's
  (float64 to 1e-10, float32 to 1e-5), and whole `--packed` runs follow the padded run's curve;
* the deferred reads of a step's numbers (the CUDA loop reads them only at written rows): run on
  the CPU, they give the very rows of the eager loop, and a non-finite loss is still named by its
  step with no checkpoint after it;
* the device defaults: bf16 and packed fine-tuning on CUDA, fp32 and padded on the CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bertrt
from bertrt.errors import BertrtError
from bertrt.train import loop, losses, tasks
from bertrt.train.checkpoint import list_checkpoints
from bertrt.train.cli import train
from bertrt.train.config import TrainConfig
from bertrt.train.data import Example
from bertrt.train.task import pack

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
WORDS = "the a of to and in on with for from by at some old new red blue fast slow".split()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, word_tokenizer, save_model) -> dict:
    """A classification CSV and a CoNLL file of texts of 3 to 14 words (batches padded a lot),
    and a small model without dropout (so padded and packed runs compute the same thing)."""
    root = tmp_path_factory.mktemp("cuda_training")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(200)]
    csv = root / "train.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{'long' if len(t) > 40 else 'short'}\n"
                                            for t in texts))
    conll = root / "train.conll"
    conll.write_text("".join("".join(f"{w} {'B-X' if w in ('red', 'blue') else 'O'}\n"
                                     for w in t.split()) + "\n" for t in texts))
    corpus = root / "corpus.txt"  # documents of sentences, for pre-training
    corpus.write_text("\n\n".join("\n".join(texts[i:i + 4]) for i in range(0, 200, 4)) + "\n")
    vocab = root / "words.txt"
    vocab.write_text(" ".join(WORDS) + "\n")
    model = save_model(word_tokenizer(vocab), root / "model", hidden=32, heads=2,
                       max_positions=32, dropout=0.0)
    return {"csv": csv, "conll": conll, "corpus": corpus, "model": model}


# ---------------------------------------------------------------------- packed == padded
def _batch(kind: str, lengths: list[int], vocab: int, labels: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n in lengths:
        ids = [2, *torch.randint(5, vocab, (n - 2,), generator=gen).tolist(), 3]
        tags = torch.randint(0, labels, (n,), generator=gen).tolist()
        tags[0] = tags[-1] = losses.IGNORE
        examples.append(Example(ids, [0] * n, label=float(n) if kind == "regress" else n % 2,
                                tags=tags))
    collate = {"classify": tasks.collate_classification, "tag": tasks.collate_tagging,
               "regress": tasks.collate_regression}[kind]
    return collate(examples, 0)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind", ["classify", "tag", "regress"])
def test_packed_loss_and_gradients_equal_the_padded_ones(kind: str, dtype: torch.dtype,
                                                         tol: float) -> None:
    head = "token-classification" if kind == "tag" else "classification"
    labels = ["a"] if kind == "regress" else ["a", "b", "c"]
    config = bertrt.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=24, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0).with_labels(labels)
    model = bertrt.Model.from_config(config, head=head, seed=3).to(dtype=dtype)
    padded, packed = model.to_torch().train(), model.to_torch(packed=True).train()
    batch = _batch(kind, [5, 12, 3, 9], config.vocab_size, len(labels))
    loss_fn = losses.regression_loss if kind == "regress" else losses.classification_loss
    count = losses.score_counts(batch) if kind == "regress" else losses.label_counts(batch)

    def loss_and_grads(net, b, inputs):
        net.zero_grad(set_to_none=True)
        loss, stats = loss_fn(net(**inputs), b, count)
        loss.backward()
        return loss.detach(), stats, {n: p.grad.clone() for n, p in net.named_parameters()
                                      if p.grad is not None}

    keys = ("input_ids", "attention_mask", "token_type_ids")
    a = loss_and_grads(padded, batch, {k: batch[k] for k in keys})
    flat = pack(batch)
    assert flat["input_ids"].shape == (5 + 12 + 3 + 9,) and "attention_mask" not in flat
    assert flat["cu_seqlens"].tolist() == [0, 5, 17, 20, 29]
    b = loss_and_grads(packed, flat, {k: flat[k] for k in ("input_ids", "cu_seqlens",
                                                             "token_type_ids")})
    assert torch.allclose(a[0], b[0], rtol=0, atol=tol)
    assert torch.allclose(a[1], b[1], rtol=tol, atol=tol)  # the summed statistics
    assert a[2].keys() == b[2].keys() and len(a[2]) == len(list(padded.parameters()))
    for name in a[2]:
        assert torch.allclose(a[2][name], b[2][name], rtol=0, atol=tol), name


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_packed_runs_follow_the_padded_runs(world, task: str, tmp_path: Path) -> None:
    data = world["csv"] if task == "classify" else world["conll"]
    curves = {}
    for flag in ("--packed", "--no-packed"):
        out = tmp_path / flag.strip("-")
        result = CliRunner().invoke(train, [
            "--task", task, "--data", str(data), "--model", str(world["model"]), "--out",
            str(out), flag, "--batch-size", "16", "--seq-len", "24", "--max-steps", "6",
            "--log-every", "1", "--lr", "1e-3", "--threads", "1"])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "run.json").read_text())["settings"]["packed"] == (
            flag == "--packed")
        curves[flag] = [r["loss"] for r in _rows(out)]
    assert len(curves["--packed"]) == 6
    assert curves["--packed"] == pytest.approx(curves["--no-packed"], rel=1e-5, abs=1e-6)


def test_packed_training_is_for_fine_tuning() -> None:
    with pytest.raises(BertrtError, match="--packed: --task pretrain trains padded batches"):
        TrainConfig(task="pretrain", packed=True).for_device(cuda=True)


# ---------------------------------------------------------------------- device defaults
def test_the_device_fills_in_precision_and_packing() -> None:
    cpu = TrainConfig(task="classify", data=("x.csv",)).for_device(cuda=False)
    assert (cpu.precision, cpu.packed) == ("fp32", False)
    gpu = TrainConfig(task="classify", data=("x.csv",)).for_device(cuda=True)
    assert (gpu.precision, gpu.packed) == ("bf16", True)
    pre = TrainConfig(task="pretrain").for_device(cuda=True)
    assert (pre.precision, pre.packed) == ("bf16", False)
    given = TrainConfig(task="tag", data=("x.conll",), precision="fp32",
                        packed=False).for_device(cuda=True)
    assert (given.precision, given.packed) == ("fp32", False)
    # a CPU run's filled-in defaults are not changes: the continue command does not name them
    assert "--precision" not in cpu.to_argv(changed_only=True)
    assert "--precision" in gpu.to_argv(changed_only=True)


# ---------------------------------------------------------------------- deferred reads
def test_deferred_reads_write_the_eager_rows(world, tmp_path: Path, monkeypatch) -> None:
    args = ["--task", "classify", "--data", str(world["csv"]), "--model", str(world["model"]),
            "--batch-size", "8", "--seq-len", "24", "--max-steps", "7", "--log-every", "3",
            "--save-every", "5", "--threads", "1"]
    eager = CliRunner().invoke(train, [*args, "--out", str(tmp_path / "eager")])
    assert eager.exit_code == 0, eager.output
    monkeypatch.setattr(loop._Run, "eager", property(lambda self: False))  # as on CUDA
    read = []
    real_read = loop._read
    monkeypatch.setattr(loop, "_read", lambda run, pending: read.append(
        [d.step for d in pending]) or real_read(run, pending))
    deferred = CliRunner().invoke(train, [*args, "--out", str(tmp_path / "deferred")])
    assert deferred.exit_code == 0, deferred.output
    # read at the first step, each --log-every, the checkpoint and the last step
    assert read == [[1], [2, 3], [4, 5], [6], [7]]
    drop = ("tokens_per_s", "elapsed_s")
    assert ([{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "eager")]
            == [{k: v for k, v in r.items() if k not in drop}
                for r in _rows(tmp_path / "deferred")])


def test_deferred_reads_still_stop_at_a_non_finite_loss(world, tmp_path: Path,
                                                        monkeypatch) -> None:
    monkeypatch.setattr(loop._Run, "eager", property(lambda self: False))
    out = tmp_path / "out"
    result = CliRunner().invoke(train, [
        "--task", "classify", "--data", str(world["csv"]), "--model", str(world["model"]),
        "--out", str(out), "--batch-size", "8", "--seq-len", "24", "--max-steps", "40",
        "--save-every", "2", "--log-every", "10", "--warmup", "0", "--clip", "0", "--lr",
        "1e30", "--threads", "1"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "training stopped" in line
    failed = int(line.removeprefix("error: step ").split(":")[0])
    kept = list_checkpoints(out)
    # no checkpoint holds a step at or after the one that went non-finite
    assert all(step < failed for step, _ in kept)
    if kept:
        assert str(kept[-1][1]) in line


# ---------------------------------------------------------------------- on CUDA
@CUDA
@pytest.mark.parametrize("task", ["classify", "pretrain"])
def test_cuda_training_saves_the_trained_weights(world, task: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = world["csv"] if task == "classify" else world["corpus"]
    result = CliRunner().invoke(train, [
        "--task", task, "--data", str(data), "--model", str(world["model"]), "--out", str(out),
        "--batch-size", "16", "--seq-len", "24", "--max-steps", "4", "--save-every", "4"])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["precision"] == "bf16" and settings["packed"] == (task == "classify")

    def query(model: bertrt.Model) -> torch.Tensor:
        return next(t for n, t in model.weights.items()
                    if n.endswith("encoder.layer.0.attention.self.query.weight"))

    assert not torch.equal(query(bertrt.load(out)), query(bertrt.load(world["model"])))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 4]  # the first and the last step (--log-every 10)
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows)
