"""The training loop: the loss goes down, the MLM head on masked rows only equals the full
formulation, activation checkpointing, the options train, and bad input refused with one clear
line (nothing saved before lost)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import bertrt
from bertrt.train import loop, losses, outdir
from bertrt.train.checkpoint import list_checkpoints
from bertrt.train.cli import train
from bertrt.train.config import TASK_KINDS, TrainConfig
from bertrt.train.task import TASKS


# ---------------------------------------------------------------------- shared little world
def write_corpus(path: Path, docs: int = 300, seed: int = 0) -> Path:
    """Documents of template sentences with structure to learn: the object follows from the
    verb, the place from the subject, and a document's subjects from its topic (which also
    makes next-sentence prediction learnable)."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a farmer",
                "the child", "our neighbour"]
    verbs = ["sees", "likes", "finds", "watches", "follows", "helps", "calls", "feeds"]
    objects = ["the ball", "a fish", "the garden", "an apple", "the river", "a small house",
               "the old tree", "a red car"]
    places = ["in the morning", "at night", "near the school", "after lunch", "by the lake"]
    out = []
    for _ in range(docs):
        topic = rng.randrange(len(subjects))
        sentences = []
        for s in range(rng.randint(3, 7)):
            who, verb = (topic + s) % len(subjects), rng.randrange(len(verbs))
            sentences.append(f"{subjects[who]} {verbs[verb]} {objects[verb]} "
                             f"{places[who % len(places)]} .")
        out.append("\n".join(sentences))
    path.write_text("\n\n".join(out) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, word_tokenizer,
          save_model) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loop")
    corpus = write_corpus(root / "corpus.txt")
    return corpus, save_model(word_tokenizer(corpus), root / "model", dropout=0.0)


def run(*args: str):
    return CliRunner().invoke(train, [str(a) for a in args])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- it learns
def test_pretraining_lowers_the_mlm_loss(world, tmp_path: Path) -> None:
    corpus, model = world
    out = tmp_path / "out"
    result = run("--data", corpus, "--model", model, "--out", out, "--batch-size", 16,
                 "--seq-len", 32, "--max-steps", 200, "--lr", 3e-3, "--log-every", 10,
                 "--save-every", 100, "--threads", 1)
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, *range(10, 201, 10)]
    for key in ("step", "loss", "lr", "tokens_per_s", "mlm_loss", "mlm_acc", "nsp_loss",
                "nsp_acc", "grad_norm"):
        assert key in rows[-1]
    vocab = bertrt.load(model).config.vocab_size
    first, last = rows[0]["mlm_loss"], sum(r["mlm_loss"] for r in rows[-5:]) / 5
    print(f"MLM loss {first:.3f} -> {last:.3f} (ln V = {math.log(vocab):.3f}), "
          f"tokens/s {rows[-1]['tokens_per_s']:.0f}")
    assert abs(first - math.log(vocab)) < 0.1  # an untrained model: uniform over the vocab
    assert last < first - 0.6  # a per-step loss over ~60 masked tokens: noisy, so averaged
    # OUT is the final model, loadable; the end says where it is and what comes next
    final = bertrt.load(out)
    assert final.head == "pretraining" and final.has_tokenizer
    assert f"bertrt export {out / 'model.onnx'} --model {out}" in result.output
    assert "bertrt serve-bench" in result.output
    assert f"bertrt inspect {out} --batch 8 --seq 128" in result.output
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["settings"]["max_steps"] == 200 and run_json["world_size"] == 1
    assert [s for s, _ in list_checkpoints(out)] == [100, 200]


def test_pretraining_evaluates_held_out_text(world, tmp_path: Path) -> None:
    corpus, model = world
    held_out = write_corpus(tmp_path / "held_out.txt", docs=20, seed=5)
    out = tmp_path / "out"
    result = run("--data", corpus, "--eval-data", held_out, "--model", model, "--out", out,
                 "--batch-size", 8, "--seq-len", 32, "--max-steps", 6, "--eval-every", 3,
                 "--log-every", 5, "--threads", 1)
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 3, 5, 6]  # eval steps are logged too
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"eval_mlm_acc", "eval_nsp_acc", "eval_mlm_loss"} <= evals[0].keys()
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert not (out / "best").exists()  # pretraining keeps no best-by-eval model
    # the closing line reports the held-out evaluation, not the last training batch
    done = next(line for line in result.output.splitlines() if line.startswith("done: "))
    assert f"eval loss {evals[1]['eval_loss']:.3f}" in done, done
    assert f"MLM acc {evals[1]['eval_mlm_acc']:.1%}" in done, done


# ---------------------------------------------------------------------- MLM on masked rows
def test_masked_rows_loss_and_grads_equal_the_all_positions_formulation() -> None:
    config = bertrt.BertConfig(vocab_size=60, hidden_size=32, num_attention_heads=4,
                               num_hidden_layers=2, intermediate_size=48,
                               max_position_embeddings=16, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
    gen = torch.Generator().manual_seed(0)
    B, S = 3, 12
    ids = torch.randint(5, 60, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[2, 9:] = 0  # padding
    positions = torch.tensor([1, 4, 5, S + 2, S + 11, 2 * S + 3, 2 * S + 8])  # flat b*S+s
    labels = torch.randint(5, 60, (len(positions),), generator=gen)
    nsp = torch.tensor([0, 1, 0])

    def grads(masked_only: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = bertrt.Model.from_config(config, head="pretraining", seed=3)
        net = model.to_torch()
        if masked_only:
            out = net(ids, mask, masked_positions=positions)
            assert out["prediction_logits"].shape == (len(positions), 60)  # (M, V)
            batch = {"mlm_labels": labels, "nsp_labels": nsp}
            denominators = torch.tensor([float(len(positions)), float(B)], dtype=torch.float64)
            loss, stats = losses.pretraining_loss(out, batch, denominators)
            assert stats[2] == len(positions) and stats[5] == B
        else:
            out = net(ids, mask)
            full = torch.full((B * S,), -100)
            full[positions] = labels
            logits = out["prediction_logits"]  # (B, S, V)
            loss = (F.cross_entropy(logits.reshape(B * S, -1), full, ignore_index=-100)
                    + F.cross_entropy(out["seq_relationship_logits"], nsp))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    loss_a, grads_a = grads(True)
    loss_b, grads_b = grads(False)
    torch.testing.assert_close(loss_a.float(), loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


# ---------------------------------------------------------------------- options
def test_activation_checkpointing_computes_the_same_loss_and_grads() -> None:
    config = bertrt.BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=2,
                               num_hidden_layers=2, intermediate_size=64,
                               max_position_embeddings=16)  # dropout 0.1: RNG replayed
    ids = torch.randint(5, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointed in (False, True):
        model = bertrt.Model.from_config(config, head="pretraining", seed=0)
        net = model.to_torch(checkpoint_layers=checkpointed).train()
        torch.manual_seed(7)
        out = net(ids, masked_positions=torch.tensor([1, 3, 12]))
        loss = (out["prediction_logits"].logsumexp(-1).sum()
                + out["seq_relationship_logits"].sum())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flags", [
    ("--optimizer", "lamb", "--lr", "2e-2"),
    ("--precision", "bf16"),
    ("--precision", "fp16", "--schedule", "poly"),
    ("--checkpoint-activations", "--grad-accum", "2", "--whole-word-mask"),
], ids=["lamb", "bf16", "fp16-poly", "ckpt-act-accum-wwm"])
def test_options_train(world, tmp_path: Path, flags: tuple[str, ...]) -> None:
    corpus, model = world
    out = tmp_path / "out"
    result = run("--data", corpus, "--model", model, "--out", out, "--batch-size", 8,
                 "--seq-len", 32, "--max-steps", 30, "--lr", 3e-3, "--log-every", 1,
                 "--threads", 1, *flags)
    assert result.exit_code == 0, result.output
    loss = [r["mlm_loss"] for r in metrics(out)]
    print(flags, [round(x, 2) for x in loss])
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < loss[0] - 0.2
    # fp16 autocast on a CPU is slow: the run says so and names bf16
    warned = "warning: --precision fp16 on the CPU" in result.output
    assert warned == ("fp16" in flags), result.output
    assert not warned or "--precision bf16" in result.output


def test_every_task_has_its_class_and_its_kind() -> None:
    assert list(TASKS) == list(TASK_KINDS) == list(train.params[0].type.choices)  # --task
    assert [TASKS[t].best_metric for t in TASKS] == [None, "macro_f1", "f1", "pearson", "f1"]


def test_config_round_trips_through_argv() -> None:
    cfg = TrainConfig(task="classify", data=("a.csv",), eval_data=("b.csv",), lr=2e-4,
                      checkpoint_activations=True, nproc=2)
    parsed = train.make_context("train", cfg.to_argv()).params
    again = TrainConfig(**{**parsed, "nproc": 2})  # nproc is the launcher's
    assert again.to_dict() == cfg.to_dict()


# ---------------------------------------------------------------------- bad input
def test_empty_corpus_is_one_clear_error(world, tmp_path: Path) -> None:
    _, model = world
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for model_args in (("--model", model), ()):  # the model's vocabulary, or one trained
        result = run("--data", empty, *model_args, "--out", tmp_path / "out", "--seq-len", 32)
        assert result.exit_code == 2
        assert result.output.splitlines()[-1].startswith(f"error: {empty}: ")
        assert "train_vocab" not in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()  # a refused run leaves no --out behind


def test_seq_len_above_max_positions(world, tmp_path: Path) -> None:
    corpus, model = world
    result = run("--data", corpus, "--model", model, "--out", tmp_path / "out",
                 "--seq-len", 100)
    assert result.exit_code == 2
    assert "--seq-len 100 exceeds max_position_embeddings=64" in result.output
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused(world, tmp_path: Path) -> None:
    corpus, model = world
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run("--data", corpus, "--model", model, "--out", out, "--max-steps", 2)
    assert result.exit_code == 2 and "not empty" in result.output
    assert "--resume" in result.output and "--overwrite" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = run("--data", corpus, "--model", model, "--out", out, "--max-steps", 2,
                 "--batch-size", 4, "--seq-len", 32, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces only our files


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world,
                                                                  tmp_path: Path) -> None:
    corpus, model = world
    out = tmp_path / "out"
    result = run("--data", corpus, "--model", model, "--out", out, "--batch-size", 8,
                 "--seq-len", 32, "--max-steps", 20, "--save-every", 1, "--warmup", 0,
                 "--clip", 0, "--lr", 1e30)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "training stopped" in line
    assert "finite" in line or "nan" in line or "inf" in line
    kept = list_checkpoints(out)
    assert kept and f"{kept[-1][1]}" in line
    bertrt.load(kept[-1][1])  # a complete, loadable model dir
    steps = [r["step"] for r in metrics(out)]
    assert steps == sorted(set(steps)) and max(steps) <= kept[-1][0] + 1


# ---------------------------------------------------------------------- --eval-split
def test_eval_split_holds_out_disjoint_documents_chosen_by_the_seed(word_tokenizer, world) -> None:
    import numpy as np

    from bertrt.train.data import index_corpus, pretraining_sources

    corpus, _ = world
    tok = word_tokenizer(corpus)
    train_src, eval_src = pretraining_sources([corpus], tok, 32, seed=3, eval_fraction=0.2)
    n_docs = index_corpus([corpus], tok).num_documents
    held, kept = set(eval_src.documents.tolist()), set(train_src.documents.tolist())
    assert not held & kept and held | kept == set(range(n_docs))
    assert len(held) == round(0.2 * n_docs)
    assert len(eval_src) > 0 and eval_src.index.num_documents == len(held)
    # every instance's text lies inside its own source's documents
    assert len(train_src.index.tokens) + len(eval_src.index.tokens) == len(
        index_corpus([corpus], tok).tokens)
    again, _ = pretraining_sources([corpus], tok, 32, seed=3, eval_fraction=0.2)[::-1]
    assert np.array_equal(again.documents, eval_src.documents)
    assert np.array_equal(again.instances, eval_src.instances)
    other = pretraining_sources([corpus], tok, 32, seed=4, eval_fraction=0.2)[1]
    assert not np.array_equal(other.documents, eval_src.documents)


def test_pretraining_evaluates_an_eval_split(world, tmp_path: Path) -> None:
    corpus, model = world
    out = tmp_path / "out"
    result = run("--data", corpus, "--eval-split", 0.2, "--model", model, "--out", out,
                 "--batch-size", 8, "--seq-len", 32, "--max-steps", 6, "--eval-every", 3,
                 "--log-every", 5, "--threads", 1)
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 3, 5, 6]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert {"eval_mlm_acc", "eval_nsp_acc", "eval_mlm_loss"} <= evals[0].keys()
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["settings"]["eval_split"] == 0.2 and run_json["eval_examples"] > 0
    # a resume with another split is refused, naming the flag
    result = run("--data", corpus, "--eval-split", 0.1, "--model", model, "--out", out,
                 "--batch-size", 8, "--seq-len", 32, "--max-steps", 6, "--eval-every", 3,
                 "--log-every", 5, "--threads", 1, "--resume")
    assert result.exit_code == 2 and "--eval-split 0.2" in result.output, result.output


def test_eval_split_defaults_and_errors(world, tmp_path: Path) -> None:
    assert TrainConfig().eval_split == 0.02  # the embedded corpus
    assert TrainConfig(data=("c.txt",)).eval_split == 0.0
    assert TrainConfig(eval_data=("e.txt",)).eval_split == 0.0
    assert "eval_split" not in TrainConfig(data=("c.txt",)).trajectory(1)
    corpus, model = world
    result = run("--data", corpus, "--eval-data", corpus, "--eval-split", 0.1, "--model", model,
                 "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: give --eval-data FILE or --eval-split F, not both"]
    result = run("--data", corpus, "--eval-split", 0.5, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--eval-split" in result.output


# ---------------------------------------------------------------------- OUT is never lost
def quick(corpus: Path, model: Path, out: Path, *flags):
    return run("--data", corpus, "--model", model, "--out", out, "--batch-size", 4,
               "--seq-len", 32, "--max-steps", 2, "--threads", 1, *flags)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def finished(world, tmp_path: Path) -> Path:
    """A complete run in `tmp_path/ow`, with a file of the user's beside it."""
    corpus, model = world
    out = tmp_path / "ow"
    result = quick(corpus, model, out)
    assert result.exit_code == 0, result.output
    (out / "notes.txt").write_text("mine")
    return out


def test_overwrite_checks_everything_before_touching_out(world, finished: Path,
                                                         tmp_path: Path) -> None:
    corpus, model = world
    before = snapshot(finished)
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text\nthe cat sees the ball .\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the cat sees the caf\xe9 .\n".encode("latin-1"))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("the\ncat\n")  # no special tokens
    for args in (("--task", "classify", "--data", nolabel, "--model", model),
                 ("--task", "classify", "--data", nolabel),  # a vocabulary trained first
                 ("--data", latin1, "--model", model),
                 ("--data", corpus, "--vocab", vocab),
                 ("--data", corpus, "--model", tmp_path / "no-such-model")):
        result = run(*args, "--out", finished, "--overwrite", "--seq-len", 32,
                     "--max-steps", 2, "--threads", 1)
        assert result.exit_code == 2, result.output
        assert result.output.splitlines()[-1].startswith("error: "), result.output
        assert snapshot(finished) == before, args  # the earlier run is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latin1.txt", "nolabel.csv", "ow", "vocab.txt"]  # and nothing was left beside it


def test_overwrite_replaces_the_run_only_when_the_new_one_is_complete(world, finished: Path,
                                                                      tmp_path: Path) -> None:
    corpus, model = world
    (finished / "model.onnx").write_bytes(b"an export of the earlier model")
    before = snapshot(finished)

    def stop(done: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    cfg = TrainConfig(data=(str(corpus),), model=str(model), out=str(finished), overwrite=True,
                      batch_size=4, seq_len=32, max_steps=3, save_every=1, threads=1, seed=1)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, on_step=stop)  # fails mid-run, a checkpoint already written
    assert snapshot(finished) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow"]
    # A kill leaves the new run's folder half-built: the next --overwrite discards it.
    leftover = outdir.staging_dir(finished)
    (leftover / "checkpoints").mkdir(parents=True)
    result = quick(corpus, model, finished, "--overwrite", "--seed", "1")
    assert result.exit_code == 0, result.output
    after = snapshot(finished)
    assert after["model.safetensors"] != before["model.safetensors"]  # the new run
    assert "model.onnx" not in after  # an export of the old model went with it
    assert after["notes.txt"] == b"mine"  # the user's own file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow"]
    assert json.loads((finished / "run.json").read_text())["settings"]["seed"] == 1


@pytest.mark.parametrize("atomic", [True, False], ids=["renameat2", "two-renames"])
def test_the_swap_keeps_the_users_files_whenever_it_stops(tmp_path: Path, monkeypatch,
                                                          atomic: bool) -> None:
    if not atomic:  # a system without renameat2
        monkeypatch.setattr(outdir, "_rename_exchange", lambda a, b: False)
    out, new = tmp_path / "ow", outdir.staging_dir(tmp_path / "ow")
    for folder, text in ((out, "old"), (new, "new")):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "model.safetensors").write_text(text)
    (out / "notes.txt").write_text("mine")
    outdir.replace_out(new, out)
    assert snapshot(out) == {"model.safetensors": b"new", "notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow"]
    # stopped after the exchange, before the user's file moved: the next run finishes the move
    old = outdir.staging_dir(out)
    old.mkdir()
    (old / "model.safetensors").write_text("older")
    (old / "todo.txt").write_text("also mine")
    outdir.recover_out(out)
    assert snapshot(out) == {"model.safetensors": b"new", "notes.txt": b"mine",
                             "todo.txt": b"also mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow"]
    # stopped between the two renames of the fallback: OUT is missing, the old run comes back
    out.rename(tmp_path / ".ow.bertrt-old")
    new.mkdir()
    (new / "model.safetensors").write_text("newer")
    outdir.recover_out(out)
    assert snapshot(out)["model.safetensors"] == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow"]


# ---------------------------------------------------------------------- what it shows
def test_the_progress_bar_is_for_terminals(world, tmp_path: Path) -> None:
    corpus, model = world
    piped = quick(corpus, model, tmp_path / "a")  # CliRunner's stderr is not a terminal
    assert piped.exit_code == 0, piped.output
    assert "\r" not in piped.output and "step/s" not in piped.output, piped.output
    assert "step 2/2: loss " in piped.output  # a plain line per checkpoint instead
    shown = quick(corpus, model, tmp_path / "b", "--progress")
    assert shown.exit_code == 0 and "\r" in shown.output, shown.output
    assert TrainConfig(progress=False).to_argv()[-1] == "--no-progress"


def test_every_option_has_one_help_line_with_its_default() -> None:
    ctx = train.make_context("train", [])
    for param in train.params:
        if param.name == "help":
            continue
        record = param.get_help_record(ctx)
        assert record is not None and record[1], param.name
        assert "[default: " in record[1], (param.name, record[1])
