"""OpenVINO as a backend: fp32 equals ONNX Runtime within 1e-4 (padded and packed), bf16 keeps
MiniLM's mean-pooled embeddings of 500 real texts at cosine >= 0.999 where the CPU has native
bf16 (and is refused where it has not), and `backend="auto"` keeps the fastest candidate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

import bertrt  # noqa: E402
import bertrt.serve.backends as backends  # noqa: E402
import bertrt.serve.engine as engine_module  # noqa: E402
from bertrt.errors import BertrtError  # noqa: E402
from bertrt.padding import pack_rows, pad_rows  # noqa: E402
from bertrt.serve import InferenceEngine  # noqa: E402
from bertrt.serve.backends import OpenVinoBackend, OrtBackend, native_bf16  # noqa: E402
from bertrt.serve.selection import Candidate, with_streams  # noqa: E402


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def minilm_model(minilm_dir: Path) -> bertrt.Model:
    return bertrt.load(minilm_dir, head="none")


@pytest.fixture(scope="module")
def sequences(minilm_model: bertrt.Model, real_texts: list[str]) -> list[np.ndarray]:
    """40 real texts as token ids, lengths 3..128."""
    enc = minilm_model.tokenizer(real_texts[:38] + ["", "a"], max_length=128, padding=False)
    return list(enc["input_ids"])


@pytest.mark.parametrize("packed", [False, True])
def test_fp32_equals_onnx_runtime(minilm_model, sequences, packed, tmp_path):
    path = minilm_model.export_onnx(tmp_path / "m.onnx", flavour="standard", packed=packed)
    ort_backend, ov = OrtBackend(path, threads=2), OpenVinoBackend(path, threads=2)
    assert ov.packed is packed and not ov.reduced_precision
    # three batches of different shapes: OpenVINO's dynamic shapes take each as it comes
    for rows in (sequences[:1], sequences[:7], sequences):
        if packed:
            ids, cu = pack_rows(rows)
            batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "cu_seqlens": cu}
        else:
            ids = pad_rows(rows)
            mask = (np.arange(ids.shape[1]) < np.array([len(r) for r in rows])[:, None])
            batch = {"input_ids": ids, "attention_mask": mask.astype(np.int64),
                     "token_type_ids": np.zeros_like(ids)}
        want, got = ort_backend.run(batch), ov.run(batch)
        assert set(got) == set(want) == {"last_hidden_state", "pooler_output"}
        for name in want:
            if not packed and name == "last_hidden_state":  # real tokens only
                keep = batch["attention_mask"].astype(bool)
                want[name], got[name] = want[name][keep], got[name][keep]
            assert got[name].shape == want[name].shape
            assert np.abs(got[name] - want[name]).max() <= 1e-4, name
    if packed:
        assert ov.token_outputs == {"last_hidden_state"}


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16/AMX)")
def test_bf16_keeps_the_embedding_gate(minilm_dir, real_texts):
    with InferenceEngine(minilm_dir, backend="ort", threads=2, max_length=128) as engine:
        fp32 = engine.embed(real_texts, pooling="mean", normalize=False)
    with InferenceEngine(minilm_dir, backend="openvino", precision="bf16", threads=2,
                         max_length=128) as engine:
        assert engine.precision == "bf16" and engine.packed
        assert engine.backend.reduced_precision
        bf16 = engine.embed(real_texts, pooling="mean", normalize=False)
    agree = cosine(fp32, bf16)
    assert agree.min() >= 0.999, (agree.min(), agree.mean())
    assert np.abs(fp32 - bf16).max() > 1e-4  # bf16 really ran: it is not fp32's answer


def test_bf16_refused_without_native_bf16(minilm_dir, monkeypatch):
    monkeypatch.setattr(backends, "native_bf16", lambda core=None: False)
    with pytest.raises(BertrtError, match="backend openvino: this CPU has no native bf16"):
        InferenceEngine(minilm_dir, backend="openvino", precision="bf16")
    from bertrt.serve.selection import auto_candidates

    assert [str(c) for c in auto_candidates("bf16")] == ["ort fp32", "openvino fp32"]


def test_an_ort_flavour_file_is_refused(tmp_path):
    model = bertrt.Model.from_config(bertrt.BertConfig.preset("tiny", vocab_size=80))
    path = model.export_onnx(tmp_path / "ort.onnx", flavour="ort")
    with pytest.raises(BertrtError, match="an ort-flavour export .* export it with --flavour "
                                          "standard"):
        InferenceEngine(path, backend="openvino", vocab=_vocab(tmp_path))


def _vocab(folder: Path) -> Path:
    """A vocabulary of the tiny preset's 80 ids (the .onnx file's sha256 is not checked
    before the backend is refused)."""
    path = folder / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                              + [f"w{i}" for i in range(75)]) + "\n")
    return path


def test_auto_keeps_the_fastest_and_remembers_it(tmp_path, monkeypatch):
    tok = bertrt.Tokenizer(_vocab(tmp_path).read_text().split())
    model = bertrt.Model.from_config(bertrt.BertConfig.preset("tiny", vocab_size=80), seed=0,
                                     tokenizer=tok)
    model_dir = model.save(tmp_path / "model")
    timed: list[str] = []
    speed = {("openvino", "fp32"): 5.0, ("ort", "fp32"): 9.0, ("ort", "int8"): 3.0}

    def fake_time(backend, batch, query, pad_id, streams=1):
        out = backend.run_sequences(batch, pad_id)  # each candidate really runs
        assert len(out) == len(batch)
        key = (backend.name, backend.precision)
        timed.append(f"{key[0]} {key[1]}")
        return speed.get(key, 50.0), 1.0

    monkeypatch.setattr(engine_module, "time_backend", fake_time)
    monkeypatch.setattr(backends, "native_bf16", lambda core=None: False)
    with InferenceEngine(model_dir) as engine:
        assert (engine.backend_name, engine.precision) == ("openvino", "fp32")
        assert [str(t.candidate) for t in engine.trials] == ["openvino fp32", "ort fp32"]
        assert "auto: fastest of openvino fp32 5.0+1.0 ms, ort fp32 9.0+1.0 ms" in \
            engine.description
        got = engine.embed(["w1 w2 w3", "w4"], pooling="mean")
    with InferenceEngine(model_dir, backend="ort") as engine:
        np.testing.assert_allclose(got, engine.embed(["w1 w2 w3", "w4"], pooling="mean"),
                                   atol=1e-5)
    assert sorted(timed) == ["openvino fp32", "ort fp32"]
    timed.clear()
    with InferenceEngine(model_dir) as engine:  # remembered: started, not timed again
        assert engine.backend_name == "openvino" and not engine.trials and not timed
    # int8 admits every precision: the fastest is int8 on ONNX Runtime
    with InferenceEngine(model_dir, precision="int8") as engine:
        assert (engine.backend_name, engine.precision) == ("ort", "int8")
        assert sorted(timed) == ["openvino fp32", "ort fp32", "ort int8"]
    # a loaded server's engine (streams): at a precision ONNX Runtime runs, ONNX Runtime
    # (`with_streams`); OpenVINO keeps the precisions only it runs
    timed.clear()
    with InferenceEngine(model_dir, threads=2, streams=2) as engine:
        assert engine.backend_name == "ort" and engine.streams == 2 and not timed
    with InferenceEngine(model_dir, threads=2, streams=2, precision="int8") as engine:
        assert sorted(timed) == ["ort fp32", "ort int8"]
    assert with_streams([Candidate("openvino", "fp32"), Candidate("ort", "fp32"),
                         Candidate("openvino", "bf16")]) == [Candidate("ort", "fp32"),
                                                              Candidate("openvino", "bf16")]
    # without openvino installed, auto has one fp32 candidate and times nothing
    monkeypatch.setattr("bertrt.serve.selection.installed", lambda name: name != "openvino")
    timed.clear()
    with InferenceEngine(model_dir, threads=1) as engine:
        assert engine.backend_name == "ort" and not engine.trials and not timed


def test_streams_compile_a_narrow_model_that_several_threads_run_at_once(minilm_dir,
                                                                         sequences):
    """`streams` > 1 on packed OpenVINO: the model compiled again to that many streams of one
    thread (`Backend.narrow`); threads running it at once, each on an infer request of its
    own, get what one thread gets, and what the wide backend gives within fp32 noise."""
    import threading

    from bertrt.serve.workload import Request

    with InferenceEngine(minilm_dir, backend="openvino", threads=2, streams=2) as engine:
        narrow = engine.backend.narrow
        assert engine.streams == 2 and isinstance(narrow, OpenVinoBackend) and narrow.packed
        assert "2 streams of 1 thread" in narrow.description
        assert narrow.compiled.get_property("NUM_STREAMS") == 2
        assert narrow.fetched == engine.backend.fetched  # the pooler dropped there too
        batches = [[Request(ids, np.zeros_like(ids)) for ids in sequences[i::8]]
                   for i in range(8)]
        alone = [narrow.run_sequences(b).pool("last_hidden_state", "mean") for b in batches]
        wide = [engine.backend.run_sequences(b).pool("last_hidden_state", "mean")
                for b in batches]
        together: list[np.ndarray | None] = [None] * len(batches)
        threads_seen: set[int] = set()

        def work(k: int) -> None:
            for i in range(k, len(batches), 2):
                together[i] = narrow.run_sequences(batches[i]).pool("last_hidden_state",
                                                                    "mean")
                threads_seen.add(threading.get_ident())

        workers = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert len(threads_seen) == 2
        for a, b, w in zip(alone, together, wide):
            np.testing.assert_array_equal(b, a)
            np.testing.assert_allclose(a, w, atol=1e-5)
    with InferenceEngine(minilm_dir, backend="openvino", packed=False, streams=2) as engine:
        assert engine.streams == 1 and engine.backend.narrow is None  # padded: one at a time
