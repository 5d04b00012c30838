"""serve-bench: workload -> batcher -> backends -> report, through the CLI and piece by piece.

A tiny random model (2 layers, hidden 128) with a small WordPiece vocabulary keeps every run
well under a second; numbers are checked for consistency with the workload, not for speed.
"""

from __future__ import annotations

import itertools
import json
import string
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bertrt import BertConfig, Model, Tokenizer
from bertrt.errors import BertrtError
from bertrt.serve import (
    Backend,
    BackendsDisagree,
    BenchOptions,
    FixedBatcher,
    OrtBackend,
    Request,
    Shape,
    SyntheticWorkload,
    TextWorkload,
    TorchBackend,
    benchmark_model,
    max_abs_diff,
    pad_batch,
    read_texts,
    resolve_target,
    run_benchmark,
)
from bertrt.serve.cli import serve_bench

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "quick", "brown", "fox", "jumps",
         "over", "lazy", ".", ",", "!", "?", "##ed", "##ing"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(string.ascii_lowercase)
         + [f"##{c}" for c in string.ascii_lowercase])
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "A cat sat.",
         "Dogs jumped over mats, and cats sat on the quick fox!",
         "zebra",
         "the cat sat on the mat"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = Tokenizer(VOCAB)
    config = BertConfig.preset("tiny", vocab_size=len(VOCAB), max_position_embeddings=64)
    model = Model.from_config(config, seed=0, tokenizer=tokenizer)
    return model.save(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import bertrt

    return bertrt.load(tiny_dir).export_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def invoke(*args: object) -> object:
    return CliRunner().invoke(serve_bench, [str(a) for a in args])


def one_error_line(result: object) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ------------------------------------------------------------------------- the whole command
def test_synthetic_report_rows_counts_and_cross_check(tiny_dir, tmp_path):
    out = tmp_path / "report.json"
    result = invoke(tiny_dir, "--backend", "ort", "--backend", "torch", "--batch-sizes", "1,4",
                    "--seq-lens", "8,16", "--warmup", "1", "--iters", "3", "--threads", "1",
                    "--json", out, "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    expected = [(f"{b}x{s}", name) for b in (1, 4) for s in (8, 16) for name in ("ort", "torch")]
    assert [(r["shape"], r["backend"]) for r in rows] == expected
    for r in rows:
        b, s = r["batch_size"], r["seq_len"]
        assert r["batches"] == 3 and r["sequences"] == b * 3
        assert r["tokens"] == r["positions"] == b * s * 3  # synthetic: nothing is padded
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["min_ms"] <= r["p50_ms"]
        assert r["sequences_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["sequences_per_s"] == pytest.approx(r["sequences"] / r["seconds"])
    assert report["gap_s"] > 0  # interleaved backends pause before each timed batch
    check = report["cross_check"]
    assert check["reference"] == "ort" and check["shape"] == "1x8"
    torch_check = check["results"]["torch"]
    assert set(torch_check["per_output"]) == {"last_hidden_state", "pooler_output"}
    assert 0 <= torch_check["max_abs_diff"] < 1e-4
    # the human table: every shape once, both backends, the cross-check line
    assert "cross-check on the first batch (1x8): torch vs ort" in result.output
    table = result.output[result.output.index("shape"):]
    assert all(f"\n{shape} " in table for shape in ("1x8", "1x16", "4x8", "4x16"))


def test_texts_workload_counts_real_tokens_and_padding(tiny_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:4]) + "\n\n", encoding="utf-8")  # a blank line: skipped
    result = invoke(tiny_dir, "--texts", texts, "--batch-sizes", "2,3", "--iters", "3",
                    "--warmup", "0", "--threads", "1", "--json", "-", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tok = Tokenizer.from_dir(tiny_dir)
    lengths = [len(tok.encode(t)) for t in TEXTS[:4]]
    assert len(set(lengths)) > 1  # the check below means something only with unequal lengths
    for batch_size in (2, 3):
        # one untimed cross-check batch, then 3 timed ones, cycling through the texts
        stream = itertools.cycle(lengths)
        batches = [[next(stream) for _ in range(batch_size)] for _ in range(4)][1:]
        rows = [r for r in report["rows"] if r["batch_size"] == batch_size]
        assert [r["backend"] for r in rows] == ["ort", "torch"]
        for r in rows:
            assert r["shape"] == f"{batch_size}xtext" and r["seq_len"] is None
            assert r["tokens"] == sum(sum(b) for b in batches)
            assert r["positions"] == sum(len(b) * max(b) for b in batches)
            assert r["tokens"] < r["positions"]
            assert r["tokens_per_s"] < r["positions_per_s"]
    # padded batches: outputs compared on real positions only, and they agree
    assert report["cross_check"]["results"]["torch"]["max_abs_diff"] < 1e-4
    assert report["workload"]["texts"] == 4


def test_packed_int8_and_openvino_variants_in_arrival_and_sorted_order(tiny_dir, tmp_path):
    pytest.importorskip("openvino")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS * 3) + "\n", encoding="utf-8")
    variants = ["ort", "ort:packed", "ort:packed:int8", "openvino:packed", "torch:packed"]
    result = invoke(tiny_dir, "--texts", texts, "--batch-sizes", "4", "--order",
                    "arrival,sorted", "--backend", ",".join(variants), "--iters", "3",
                    "--warmup", "0", "--threads", "1", "--json", "-", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {(r["shape"], r["backend"]): r for r in report["rows"]}
    assert set(rows) == {(shape, v) for shape in ("4xtext", "4xtext sorted") for v in variants}
    for (shape, variant), row in rows.items():
        padded = rows[(shape, "ort")]
        assert row["tokens"] == padded["tokens"]  # the same batches, real tokens counted
        if variant == "ort":
            assert row["positions"] > row["tokens"]  # padding computed
        else:
            assert row["positions"] == row["tokens"]  # packed: none
    # sorting the queue first leaves less padding in the padded batches
    assert rows[("4xtext sorted", "ort")]["positions"] < rows[("4xtext", "ort")]["positions"]
    checks = report["cross_check"]["results"]
    for variant in ("ort:packed", "openvino:packed", "torch:packed"):  # fp32: the 1e-4 bound
        assert not checks[variant]["relative"] and checks[variant]["max_abs_diff"] < 1e-4
    int8 = checks["ort:packed:int8"]
    assert int8["relative"] and int8["failing"] == [] and int8["max_abs_diff"] > 0
    assert report["backend_descriptions"]["openvino:packed"].startswith("openvino ")


def test_onnx_model_with_model_dir_runs_torch_too(tiny_dir, tiny_onnx):
    result = invoke(tiny_onnx, "--model-dir", tiny_dir, "--backend", "ort,torch",
                    "--batch-sizes", "2", "--seq-lens", "8", "--iters", "1", "--warmup", "0",
                    "--threads", "1", "--json", "-", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["backend"] for r in report["rows"]] == ["ort", "torch"]
    assert report["cross_check"]["results"]["torch"]["max_abs_diff"] < 1e-4


def test_ort_cuda_is_skipped_with_a_message_without_cuda(tiny_onnx):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: nothing to skip")  # GPU machines only
    result = invoke(tiny_onnx, "--backend", "ort,ort-cuda", "--batch-sizes", "1", "--seq-lens",
                    "4", "--iters", "1", "--warmup", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "skipping backend ort-cuda" in result.output and "CUDAExecutionProvider" in (
        result.output)
    alone = one_error_line(invoke(tiny_onnx, "--backend", "ort-cuda"))
    assert "no backend left" in alone


# ------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    data = tiny_onnx.read_bytes()
    files = {
        "truncated": d / "truncated.onnx", "corrupt": d / "corrupt.onnx",
        "empty_texts": d / "empty.txt", "latin1_texts": d / "latin1.txt",
        "blank_texts": d / "blank.txt",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["corrupt"].write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
    files["empty_texts"].write_bytes(b"")
    files["latin1_texts"].write_bytes("a cat\ncaf\u00e9 au lait\n".encode("latin-1"))
    files["blank_texts"].write_text("\n  \n\n", encoding="utf-8")
    return files


@pytest.mark.parametrize("args,message", [
    (["{truncated}"], "truncated or corrupt"),
    (["{corrupt}"], "truncated or corrupt"),
    (["{model}", "--texts", "{empty_texts}"], "empty.txt: empty"),
    (["{model}", "--texts", "{latin1_texts}"], "line 2: invalid UTF-8"),
    (["{model}", "--texts", "{blank_texts}"], "has no text"),
    (["{model}", "--texts", "{missing}"], "no such file"),
    (["{missing}"], "no such file or directory"),
    (["{model}", "--backend", "tensorrt"], "'tensorrt' is unknown"),
    (["{onnx}", "--backend", "torch"], "--model-dir"),
    (["{onnx}", "--texts", "{latin1_texts}"], "--vocab"),
    (["{model}", "--batch-sizes", "1,x"], "--batch-sizes"),
    (["{model}", "--seq-lens", "999"], "max_position_embeddings=64"),
    (["{model}", "--iters", "3", "--duration", "1"], "not both"),
    (["{model}", "--json", "{missing}/out.json"], "does not exist"),
    (["{model}", "--backend", "ort:fast"], "'fast' is not a modifier"),
    (["{model}", "--backend", "ort:bf16"], "ort runs fp32, int8, not bf16"),
    (["{onnx}", "--backend", "ort:packed"], "tiny.onnx is a padded fp32 export"),
    (["{model}", "--texts", "{texts}", "--order", "random"], "--order: expected arrival"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tiny_onnx, bad_files, tmp_path, args,
                                          message):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    names = {**{k: str(v) for k, v in bad_files.items()}, "model": str(tiny_dir),
             "onnx": str(tiny_onnx), "missing": str(tmp_path / "missing"), "texts": str(texts)}
    line = one_error_line(invoke(*[a.format(**names) for a in args], "--no-progress"))
    assert message in line


def test_missing_onnxruntime_says_what_to_install(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    line = one_error_line(invoke(tiny_dir, "--backend", "ort"))
    assert "onnxruntime is not installed" in line and "bertrt[cpu]" in line


# ------------------------------------------------------------------------- the pieces
def test_batcher_pads_to_the_longest_and_masks_real_lengths():
    rng = np.random.default_rng(0)
    lengths = [3, 5, 2, 4, 1]
    requests = [Request(rng.integers(5, 50, n), np.ones(n, dtype=np.int64)) for n in lengths]
    batches = list(FixedBatcher(2, pad_id=1).batches(requests))  # not 0: the fill must be it
    assert [b.inputs["input_ids"].shape for b in batches] == [(2, 5), (2, 4), (1, 1)]
    it = iter(requests)
    for batch in batches:
        mask = batch.inputs["attention_mask"]
        np.testing.assert_array_equal(mask.sum(axis=1), lengths[:batch.size])
        np.testing.assert_array_equal(batch.lengths, lengths[:batch.size])
        lengths = lengths[batch.size:]
        assert batch.tokens == int(mask.sum()) and batch.positions == mask.size
        for row in range(batch.size):
            req = next(it)
            n = req.length
            np.testing.assert_array_equal(batch.inputs["input_ids"][row, :n], req.input_ids)
            np.testing.assert_array_equal(batch.inputs["token_type_ids"][row, :n],
                                          req.token_type_ids)
            assert (batch.inputs["input_ids"][row, n:] == 1).all()
            assert (batch.inputs["token_type_ids"][row, n:] == 0).all()
            assert (mask[row, n:] == 0).all() and (mask[row, :n] == 1).all()
    with pytest.raises(ValueError):
        pad_batch([])


def test_text_workload_tokenizes_the_real_lines(tiny_dir, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\ufeff" + "\n".join(TEXTS) + "\n", encoding="utf-8")
    assert read_texts(path) == TEXTS  # BOM dropped
    tok = Tokenizer.from_dir(tiny_dir)
    workload = TextWorkload.from_file(path, tok, [2], max_length=8)
    stream = workload.requests(Shape(2, None))
    for text in TEXTS + TEXTS[:2]:  # it cycles
        req = next(stream)
        expected = tok.encode(text, max_length=8)
        assert req.input_ids.tolist() == expected
        assert req.input_ids[0] == tok.cls_id and req.input_ids[-1] == tok.sep_id
    assert max(workload.lengths) == 8  # truncated


def test_synthetic_workload_ids_are_valid_and_framed():
    workload = SyntheticWorkload([2], [6], vocab_size=40, special_ids=[0, 1, 2, 3, 4],
                                 cls_id=2, sep_id=3, max_positions=8)
    reqs = list(itertools.islice(workload.requests(Shape(2, 6)), 50))
    ids = np.stack([r.input_ids for r in reqs])
    assert (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()
    assert ids[:, 1:-1].min() >= 5 and ids.max() < 40
    again = next(workload.requests(Shape(2, 6)))
    np.testing.assert_array_equal(again.input_ids, reqs[0].input_ids)  # reproducible
    with pytest.raises(BertrtError, match="max_position_embeddings=8"):
        SyntheticWorkload([1], [9], vocab_size=40, max_positions=8)


def test_read_texts_names_the_bad_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"fine\nstill fine\nnot \xff fine\n")
    with pytest.raises(BertrtError, match=r"line 3: invalid UTF-8 \(byte 5 of the line\); "
                       r"convert the file to UTF-8, e\.g\. from Latin-1: iconv -f latin1"):
        read_texts(path)


def test_run_benchmark_api_and_duration_mode(tiny_dir, tiny_onnx):
    import bertrt

    model = bertrt.load(tiny_dir)
    backends = [OrtBackend(tiny_onnx, threads=1), TorchBackend(model, threads=1)]
    try:
        report = run_benchmark(SyntheticWorkload([2], [8], vocab_size=len(VOCAB)), backends,
                               warmup=0, duration=0.05, progress=False)
    finally:
        for b in backends:
            b.close()
    ort_row, torch_row = report.rows
    assert ort_row["batches"] == torch_row["batches"] >= 1  # interleaved: same batches each
    assert ort_row["tokens"] == torch_row["tokens"] == 16 * ort_row["batches"]
    assert report.meta["iters"] is None and report.meta["duration_s"] == 0.05
    # the backends agree on real positions; padding does not take part in the comparison
    assert report.cross_check["results"]["torch"]["max_abs_diff"] < 1e-4


def test_onnx_backend_feeds_only_declared_inputs_in_declared_types(tiny_onnx):
    backend = OrtBackend(tiny_onnx, threads=1)
    declared = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                for i in onnx.load(str(tiny_onnx)).graph.input}
    batch = pad_batch([Request(np.array([2, 7, 3]), np.zeros(3, dtype=np.int64))]).inputs
    as_int32 = {k: v.astype(np.int32) for k, v in batch.items()}  # not what the file declares
    feeds = backend.feeds({**as_int32, "extra": np.zeros(1)})
    assert {k: v.dtype for k, v in feeds.items()} == declared
    assert all(np.array_equal(feeds[k], batch[k]) for k in declared)
    out = backend.run(as_int32)
    assert out["last_hidden_state"].shape == (1, 3, 128)


def test_max_abs_diff_masks_only_per_token_outputs():
    """A (B, H) pooler output whose H happens to equal S must be compared whole; outputs
    only one side has are left out, and outputs of different shapes differ infinitely."""
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    a = {"pooler_output": np.zeros((2, 4)), "last_hidden_state": np.zeros((2, 4, 3))}
    b = {"pooler_output": np.zeros((2, 4)), "last_hidden_state": np.zeros((2, 4, 3))}
    b["pooler_output"][0, 3] = 0.5  # column 3 is no position: it must count
    b["last_hidden_state"][0, 3] = 9.0  # a padded position: it must not
    assert max_abs_diff(a, b, mask) == {"pooler_output": 0.5, "last_hidden_state": 0.0}
    b["logits"] = np.zeros((2, 2))
    b["pooler_output"] = np.zeros((2, 5))
    assert max_abs_diff(a, b, mask) == {"pooler_output": float("inf"), "last_hidden_state": 0.0}


# ------------------------------------------------------------------------- the cross-check
class FakeBackend(Backend):
    """Numpy only: outputs are a fixed function of the ids, plus `offset` on the hidden states;
    counts its calls."""

    def __init__(self, name: str, offset: float = 0.0, reduced_precision: bool = False,
                 prepare_s: float = 0.0) -> None:
        self.name, self.offset, self.prepare_s = name, offset, prepare_s
        self.reduced_precision = reduced_precision
        self.prepared = self.executed = 0

    def prepare(self, batch):
        self.prepared += 1
        time.sleep(self.prepare_s)
        return batch

    def execute(self, prepared):
        self.executed += 1
        ids = prepared["input_ids"].astype(np.float32)
        hidden = np.stack([ids, -ids], axis=-1) + self.offset  # (B, S, 2), |x| up to 40
        return {"last_hidden_state": hidden, "pooler_output": hidden[:, 0]}


def fake_run(*backends: Backend, **kwargs: object):
    workload = SyntheticWorkload([2], [6], vocab_size=40, seed=0)
    return run_benchmark(workload, list(backends), warmup=1, iters=2, progress=False, **kwargs)


def test_backends_that_disagree_stop_the_run_before_any_timing():
    ref, off = FakeBackend("ref"), FakeBackend("off", offset=1e-3)
    with pytest.raises(BackendsDisagree) as err:
        fake_run(ref, off)
    # the check batch ran, nothing after it: no warm-up, no timed batch
    assert (ref.executed, off.executed) == (1, 1)
    message = str(err.value)
    assert "\n" not in message
    assert "off vs ref" in message and "last_hidden_state 1.00e-03" in message
    assert "pooler_output 1.00e-03" in message and "nothing timed" in message
    assert err.value.check["results"]["off"]["failing"] == ["last_hidden_state",
                                                            "pooler_output"]
    # within the bound: timed as before
    report = fake_run(FakeBackend("ref"), FakeBackend("near", offset=5e-5))
    assert report.cross_check["results"]["near"]["failing"] == []
    assert [r["batches"] for r in report.rows] == [2, 2]


def test_a_mismatch_can_be_timed_anyway_and_is_kept_in_the_report():
    report = fake_run(FakeBackend("ref"), FakeBackend("off", offset=1.0), stop_on_mismatch=False)
    result = report.cross_check["results"]["off"]
    assert result["failing"] == ["last_hidden_state", "pooler_output"]
    assert result["max_abs_diff"] == pytest.approx(1.0)
    assert [r["batches"] for r in report.rows] == [2, 2]


def test_reduced_precision_is_held_to_a_relative_bound():
    # hidden states reach |39| (ids below 40): 1e-2 relative allows about 0.39 there
    report = fake_run(FakeBackend("ref"), FakeBackend("fp16", 0.1, reduced_precision=True))
    result = report.cross_check["results"]["fp16"]
    assert result["relative"] and result["bound"] == 1e-2 and result["failing"] == []
    with pytest.raises(BackendsDisagree, match=r"bound 0\.01 x max \|ref\|"):
        fake_run(FakeBackend("ref"), FakeBackend("fp16", 1.0, reduced_precision=True))
    with pytest.raises(BackendsDisagree):  # the same 0.1 between two fp32 backends is too much
        fake_run(FakeBackend("ref"), FakeBackend("fp32", 0.1))


def test_preparing_a_batch_is_not_timed():
    slow = FakeBackend("slow", prepare_s=0.05)
    report = fake_run(slow)
    assert slow.prepared == slow.executed == 4  # check batch, 1 warm-up, 2 timed
    assert report.rows[0]["max_ms"] < 25  # execute is instant; the 50 ms prepare is outside


def test_cli_stops_with_exit_2_when_the_onnx_file_is_another_model(tiny_dir, tmp_path):
    other = Model.from_config(BertConfig.from_pretrained(tiny_dir), seed=1,
                              tokenizer=Tokenizer.from_dir(tiny_dir))
    onnx_path = other.export_onnx(tmp_path / "other.onnx")  # same vocab, other weights
    out = tmp_path / "report.json"
    result = invoke(onnx_path, "--model-dir", tiny_dir, "--backend", "ort,torch",
                    "--batch-sizes", "2", "--seq-lens", "8", "--iters", "1", "--warmup", "0",
                    "--threads", "1", "--json", out, "--no-progress")
    line = one_error_line(result)
    assert "backends disagree on the first batch (2x8), nothing timed: torch vs ort:" in line
    assert "last_hidden_state" in line and "pooler_output" in line and "bound 0.0001" in line
    assert not out.exists()


# ------------------------------------------------------------------------- the Python API
def test_resolve_target_of_an_onnx_file_with_its_model_dir(tiny_dir, tiny_onnx):
    target = resolve_target(tiny_onnx, BenchOptions(model_dir=tiny_dir, backends=["ort,torch"]))
    assert target.backends == ["ort", "torch"] and not target.is_dir
    assert target.model is not None and target.tokenizer is not None
    assert target.tokenizer.vocab == Tokenizer.from_dir(tiny_dir).vocab
    assert target.pad_id == target.tokenizer.pad_id
    # the default lengths (32, 128) capped at the model's 64 positions
    assert [s.label for s in target.workload.shapes()] == [
        f"{b}x{s}" for b in (1, 8, 32) for s in (32, 64)]
    alone = resolve_target(tiny_onnx)  # no tokenizer: ids below the metadata's vocab size
    assert alone.backends == ["ort"] and alone.tokenizer is None and alone.model is None
    assert alone.workload.vocab_size == len(VOCAB)


def test_benchmark_model_is_what_the_command_runs(tiny_dir):
    notes: list[str] = []
    report = benchmark_model(tiny_dir, BenchOptions(batch_sizes=[2], seq_lens=[8]),
                             iters=2, warmup=0, threads=1, progress=False, log=notes.append)
    assert [(r["shape"], r["backend"], r["batches"]) for r in report.rows] == [
        ("2x8", "ort", 2), ("2x8", "torch", 2)]
    assert report.meta["onnx_flavour"] == "ort" and report.meta["threads"] == 1
    assert report.meta["gap_s"] == 0.01  # two backends interleave
    assert any(n.startswith("exporting ") for n in notes)
    with pytest.raises(BertrtError, match="not both"):
        benchmark_model(tiny_dir, iters=2, duration=1.0)


def test_an_fp16_export_is_held_to_the_relative_bound(tiny_dir, tiny_onnx, tmp_path):
    import bertrt

    fp16 = bertrt.load(tiny_dir).export_onnx(tmp_path / "fp16.onnx", fp16=True)
    assert OrtBackend(fp16, threads=1).reduced_precision
    assert not OrtBackend(tiny_onnx, threads=1).reduced_precision
    result = invoke(fp16, "--model-dir", tiny_dir, "--backend", "torch,ort", "--batch-sizes",
                    "2", "--seq-lens", "8", "--iters", "1", "--warmup", "0", "--threads", "1",
                    "--json", "-", "--no-progress")
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["cross_check"]["results"]["ort"]
    assert check["relative"] and check["failing"] == []
    assert check["max_abs_diff"] > 1e-4  # over the fp32 bound: fp16 needs the relative one
