"""The ONNX lowering's structure: the op table, fused-op counts per flavour, dynamic axes,
inputs/outputs, fp16 types and tied weights, metadata, the checker, external data, and the
errors a user can cause (with nothing left behind)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import bertrt
from bertrt.graph.ops import REGISTRY
from bertrt.lower import to_onnx

MS = "com.microsoft"
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = {
    "none": ["last_hidden_state", "pooler_output"],
    "pretraining": ["last_hidden_state", "pooler_output", "prediction_logits",
                    "seq_relationship_logits"],
    "classification": ["last_hidden_state", "pooler_output", "logits"],
    "token-classification": ["last_hidden_state", "logits"],
}


def op_counts(path: Path) -> collections.Counter:
    model = onnx.load(path, load_external_data=False)
    return collections.Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)


def dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


# --------------------------------------------------------------------------- the op table
def test_fused_ops_have_an_ort_form_except_packed_attention():
    """ONNX Runtime has a contrib op for every padded fused op; its padding-removal attention
    exists for CUDA only, so the packed attention core is core ONNX in both flavours."""
    fused = {name for name, op in REGISTRY.items() if op.fused}
    with_ort = {name for name, op in to_onnx.ONNX_OPS.items() if op.ort is not None}
    assert fused - with_ort == {"PACKED_ATTENTION"} and with_ort <= fused


# --------------------------------------------------------------------------- fused-op counts
def test_minilm_ort_fused_op_counts(minilm, export):
    counts = op_counts(export(minilm, "ort", True))
    ms = {op: n for (domain, op), n in counts.items() if domain == MS}
    assert ms == {"EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6}
    # SKIP_LAYER_NORM in its core form (ONNX Runtime's CPU runs it faster), the rest fused
    assert counts[("ai.onnx", "LayerNormalization")] == 12
    assert counts[("ai.onnx", "Softmax")] == 0
    assert counts[("ai.onnx", "Erf")] == 0
    assert json.loads(props(export(minilm, "ort", True))["fusions"]) == {
        "EMBED_LAYER_NORM": 1, "ATTENTION": 6, "SKIP_LAYER_NORM": 12, "BIAS_GELU": 6,
        "PACKED_ATTENTION": 0}


@pytest.mark.parametrize("flavour,fuse", [("standard", True), ("standard", False),
                                          ("ort", False)])
def test_core_only_variants_have_no_contrib_ops(minilm, export, flavour, fuse):
    path = export(minilm, flavour, fuse)
    model = onnx.load(path, load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {""}
    assert [o.domain for o in model.opset_import] == [""]
    counts = op_counts(path)
    assert counts[("ai.onnx", "LayerNormalization")] == 13
    assert counts[("ai.onnx", "Softmax")] == 6


def test_tanh_gelu_becomes_fast_gelu(random_model, export):
    model = random_model("h32-n4-l2-gelu_new", "none")
    ms = {op: n for (d, op), n in op_counts(export(model, "ort", True)).items() if d == MS}
    assert ms == {"EmbedLayerNormalization": 1, "Attention": 2, "FastGelu": 2}


def test_skip_layer_norm_is_the_contrib_op_below_opset_17(random_model, tmp_path):
    """Core LayerNormalization starts at opset 17: below it the ort flavour writes ONNX
    Runtime's SkipLayerNormalization, packed (T, H) rows viewed as (1, T, H). Packed, the
    embeddings' sum + LayerNorm is one more (the packed pipeline does not fuse the lookups)."""
    model = random_model("h32-n4-l2-gelu_new", "none")
    for packed, skips in ((False, 4), (True, 5)):
        counts = op_counts(model.export_onnx(tmp_path / f"o13-{packed}.onnx", flavour="ort",
                                             opset=13, packed=packed))
        assert counts[(MS, "SkipLayerNormalization")] == skips
        assert counts[("ai.onnx", "LayerNormalization")] == 0
    # the contrib op's packed view gives what the core form gives (whose parity with torch
    # the parity tests check)
    from bertrt.serve.backends import OrtBackend
    from bertrt.serve.workload import Request

    rng = np.random.default_rng(0)
    requests = [Request(ids, np.zeros_like(ids)) for ids in
                (rng.integers(5, model.config.vocab_size, n) for n in (3, 9, 1, 6))]
    core = model.export_onnx(tmp_path / "o17.onnx", flavour="ort", packed=True)
    got, want = (OrtBackend(p, threads=1).run_sequences(requests).pool("last_hidden_state",
                                                                       "mean")
                 for p in (tmp_path / "o13-True.onnx", core))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_reads_lengths_from_one_mask_index(minilm, export):
    """Default (right padding): the ort pipeline's MASK_INDEX reduces the int32 mask to per-row
    lengths once (a ReduceSum), which every Attention reads as its 1-D mask_index."""
    model = onnx.load(export(minilm, "ort", True), load_external_data=False)
    nodes = {n.output[0]: n for n in model.graph.node}
    masks = {n.input[3] for n in model.graph.node if n.op_type == "Attention"}
    assert len(masks) == 1
    reduce = nodes[masks.pop()]
    assert reduce.op_type == "ReduceSum"
    assert [a.i for a in reduce.attribute if a.name == "keepdims"] == [0]
    cast = nodes[reduce.input[0]]
    assert (cast.op_type, cast.input[0]) == ("Cast", "attention_mask")
    assert cast.attribute[0].i == onnx.TensorProto.INT32
    weights = {t.name: t for t in model.graph.initializer}
    qkv = weights[next(n for n in model.graph.node if n.op_type == "Attention").input[1]]
    assert list(qkv.dims) == [384, 3 * 384]


def test_any_padding_reads_the_raw_mask_as_int32(minilm, tmp_path):
    model = onnx.load(minilm.export_onnx(tmp_path / "any.onnx", padding="any"),
                      load_external_data=False)
    casts = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    masks = {n.input[3] for n in model.graph.node if n.op_type == "Attention"}
    assert len(masks) == 1  # one Cast shared by every layer
    (mask,) = masks
    assert casts[mask].input[0] == "attention_mask"
    (embed,) = [n for n in model.graph.node if n.op_type == "EmbedLayerNormalization"]
    assert len(embed.output) == 1


# --------------------------------------------------------------------------- inputs, outputs
@pytest.mark.parametrize("head", list(OUTPUTS))
def test_inputs_outputs_and_dynamic_axes(random_model, export, head):
    model = random_model("h24-n2-l2-gelu", head)
    for flavour in ("ort", "standard"):
        graph = onnx.load(export(model, flavour, True)).graph
        assert [i.name for i in graph.input] == INPUTS  # masked_positions is not exported
        for i in graph.input:
            assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
            assert dims(i) == ["batch", "seq"]
        assert [o.name for o in graph.output] == OUTPUTS[head]
        shapes = {o.name: dims(o) for o in graph.output}
        h, labels, vocab = 24, 3, 64
        assert shapes["last_hidden_state"] == ["batch", "seq", h]
        if "pooler_output" in shapes:
            assert shapes["pooler_output"] == ["batch", h]
        if head == "pretraining":
            assert shapes["prediction_logits"] == ["batch", "seq", vocab]
            assert shapes["seq_relationship_logits"] == ["batch", 2]
        if head == "classification":
            assert shapes["logits"] == ["batch", labels]
        if head == "token-classification":
            assert shapes["logits"] == ["batch", "seq", labels]


def test_onnx_shape_inference_agrees_on_the_standard_flavour(random_model, export):
    model = random_model("h24-n2-l2-gelu", "pretraining")
    inferred = onnx.shape_inference.infer_shapes(onnx.load(export(model, "standard", True)),
                                                 strict_mode=True)
    for out in inferred.graph.output:
        assert dims(out)[0] == "batch"


# --------------------------------------------------------------------------- fp16
@pytest.mark.parametrize("flavour", ["ort", "standard"])
def test_fp16_types_and_tied_weights(random_model, export, flavour):
    model = random_model("h24-n2-l2-gelu", "pretraining")
    path = export(model, flavour, True, fp16=True)
    graph = onnx.load(path).graph
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in graph.output)
    floats = [t for t in graph.initializer if t.data_type in (1, 10)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats
                          if t.dims)  # scalars: fp32 mask constants
    # the MLM decoder is the word table: stored once, read in place by Gemm(transB=1)
    word = [t for t in graph.initializer if list(t.dims) in ([64, 24], [24, 64])]
    assert [t.name for t in word] == ["bert.embeddings.word_embeddings.weight"]
    layer_norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert layer_norms and all(a.i == 1 for n in layer_norms for a in n.attribute
                               if a.name == "stash_type")
    if flavour == "standard":  # softmax (with the mask bias added) runs in fp32
        inferred = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True).graph
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
        softmax = [n for n in graph.node if n.op_type == "Softmax"]
        assert len(softmax) == 2
        assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in softmax)
    assert props(path)["fp16"] == "true"


def test_fp32_tied_weight_stored_once(random_model, export):
    model = random_model("h24-n2-l2-gelu", "pretraining")
    for flavour, fuse in (("ort", True), ("standard", False)):
        graph = onnx.load(export(model, flavour, fuse)).graph
        tables = [t.name for t in graph.initializer if 64 in t.dims and 24 in t.dims]
        assert tables == ["bert.embeddings.word_embeddings.weight"]


# --------------------------------------------------------------------------- metadata
def test_minilm_metadata(minilm, minilm_dir, export):
    meta = props(export(minilm, "ort", True))
    assert meta["bertrt_version"] == bertrt.__version__
    assert json.loads(meta["config"]) == json.loads(json.dumps(minilm.config.to_dict()))
    assert meta["head"] == "none"
    assert meta["flavour"] == "ort"
    assert meta["opset"] == str(to_onnx.DEFAULT_OPSET)
    vocab = (minilm_dir / "vocab.txt").read_bytes()
    assert meta["vocab_sha256"] == hashlib.sha256(vocab).hexdigest()
    assert meta["vocab_size"] == "30522"
    assert "id2label" not in meta
    assert not any(len(v) > 100_000 for v in meta.values())  # the vocab itself is not stored
    model = onnx.load(export(minilm, "standard", False), load_external_data=False)
    assert model.producer_name == "bertrt"
    assert {p.key: p.value for p in model.metadata_props}["flavour"] == "standard"
    assert json.loads({p.key: p.value for p in model.metadata_props}["fusions"]) == {
        "EMBED_LAYER_NORM": 0, "ATTENTION": 0, "SKIP_LAYER_NORM": 0, "BIAS_GELU": 0,
        "PACKED_ATTENTION": 0}


@pytest.mark.parametrize("head", ["classification", "token-classification", "pretraining"])
def test_head_metadata(random_model, export, head):
    meta = props(export(random_model("h48-n3-l1-relu", head), "standard", True))
    assert meta["head"] == head
    assert "vocab_sha256" not in meta  # the model has no tokenizer
    if head == "pretraining":
        assert "id2label" not in meta
    else:
        assert json.loads(meta["id2label"]) == {"0": "neg", "1": "neu", "2": "pos"}


def test_metadata_vocab_given_as_mapping(random_model, tmp_path):
    model = random_model("h24-n2-l2-gelu", "none")
    graph = model.graph
    weights = {n: model.weights[n].detach().numpy() for n in graph.params}
    tokens = [f"t{i}" for i in range(5)]
    path = to_onnx.export(graph, weights, tmp_path / "m.onnx", flavour="standard",
                          metadata={"vocab": {t: i for i, t in enumerate(tokens)},
                                    "note": "x"})
    meta = props(path)
    text = "".join(t + "\n" for t in tokens).encode()
    assert meta["vocab_sha256"] == hashlib.sha256(text).hexdigest()
    assert meta["vocab_size"] == "5" and meta["note"] == "x"


# --------------------------------------------------------------------------- checker, files
def test_a_model_the_checker_rejects_is_never_written(random_model, tmp_path, monkeypatch):
    model = random_model("h24-n2-l2-gelu", "none")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    assemble = to_onnx._assemble

    def broken(*args, **kwargs):  # a node of an op no opset defines
        proto = assemble(*args, **kwargs)
        proto.graph.node[0].op_type = "NoSuchOp"
        return proto

    monkeypatch.setattr(to_onnx, "_assemble", broken)
    with pytest.raises(onnx.checker.ValidationError, match="NoSuchOp"):
        model.export_onnx(path, flavour="standard")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_external_data_above_the_threshold(random_model, ort_session, tmp_path, monkeypatch):
    model = random_model("h24-n2-l2-gelu", "classification")
    inline = model.export_onnx(tmp_path / "inline.onnx", flavour="ort")
    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_THRESHOLD", 0)
    path = model.export_onnx(tmp_path / "big.onnx", flavour="ort")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data",
                                                         "inline.onnx"]
    assert path.stat().st_size < inline.stat().st_size / 3  # the weights left the file
    batch = {"input_ids": np.array([[1, 2, 3], [4, 5, 0]]),
             "attention_mask": np.array([[1, 1, 1], [1, 1, 0]]),
             "token_type_ids": np.zeros((2, 3), np.int64)}
    (logits,) = ort_session(path).run(["logits"], batch)
    (want,) = ort_session(inline).run(["logits"], batch)
    np.testing.assert_array_equal(logits, want)
    assert np.abs(logits).max() > 0


def test_overwrites_atomically(random_model, tmp_path):
    model = random_model("h24-n2-l2-gelu", "none")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    model.export_onnx(path, flavour="standard")
    assert onnx.load(str(path)).graph.name == "bert-none"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# --------------------------------------------------------------------------- user errors
def _error(model, path: Path, match: str, **kwargs) -> None:
    with pytest.raises(bertrt.BertrtError, match=match) as info:
        model.export_onnx(path, **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_flavour(random_model, tmp_path):
    _error(random_model("h24-n2-l2-gelu", "none"), tmp_path / "m.onnx", "flavour: 'trt'",
           flavour="trt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flavour,fuse,head", [("standard", True, "none"),
                                                ("ort", False, "none"),
                                                ("ort", True, "pretraining")])
def test_opset_too_old_for_layer_norm(random_model, tmp_path, flavour, fuse, head):
    model = random_model("h24-n2-l2-gelu", head)
    _error(model, tmp_path / "m.onnx", r"opset: 16 is too old for LayerNormalization .*>= 17",
           flavour=flavour, fuse=fuse, opset=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset,match", [(12, "opset: 12 is too old"), (99, "opset: 99 is newer"),
                                         ("17", "opset: expected an integer")])
def test_opset_out_of_range(random_model, tmp_path, opset, match):
    _error(random_model("h24-n2-l2-gelu", "none"), tmp_path / "m.onnx", match, opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_output_folder_missing_or_not_a_folder(random_model, tmp_path):
    model = random_model("h24-n2-l2-gelu", "none")
    _error(model, tmp_path / "nope" / "m.onnx", f"{tmp_path / 'nope'}: output folder does not")
    (tmp_path / "file").write_text("")
    _error(model, tmp_path / "file" / "m.onnx", "is not a folder")
    _error(model, tmp_path, "is a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_output_folder_not_writable(random_model, tmp_path):
    model = random_model("h24-n2-l2-gelu", "none")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not os.access(folder, os.W_OK):
            _error(model, folder / "m.onnx", "output folder is not writable")
            assert list(folder.iterdir()) == []
        else:  # root writes anywhere; /proc/self is unwritable even for root
            _error(model, Path("/proc/self/m.onnx"), "output folder is not writable")
    finally:
        folder.chmod(0o755)


def test_failed_write_leaves_nothing(random_model, tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    model = random_model("h24-n2-l2-gelu", "none")
    _error(model, tmp_path / "m.onnx", "m.onnx: cannot write .No space left on device.")
    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_THRESHOLD", 0)
    _error(model, tmp_path / "m.onnx", "m.onnx: cannot write")
    assert list(tmp_path.iterdir()) == []


def test_missing_weights_name_the_parameter(random_model, tmp_path):
    model = random_model("h24-n2-l2-gelu", "none")
    weights = {n: model.weights[n].detach().numpy() for n in model.graph.params}
    del weights["encoder.layer.1.output.dense.weight"]
    with pytest.raises(bertrt.BertrtError, match="encoder.layer.1.output.dense.weight"):
        to_onnx.export(model.graph, weights, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_fp16_overflowing_weight_is_refused(tmp_path):
    model = bertrt.Model.from_config(bertrt.BertConfig.preset("tiny", vocab_size=50,
                                                              num_hidden_layers=1))
    model.weights["encoder.layer.0.output.dense.weight"][0, 0] = 1e5
    _error(model, tmp_path / "m.onnx", "encoder.layer.0.output.dense.weight holds values beyond "
           "the fp16 range", fp16=True)
    assert list(tmp_path.iterdir()) == []
