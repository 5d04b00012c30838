"""`bertrt.onnx_info` and `inspect_onnx`: what they report equals what `onnx.load` shows, and
unreadable files give one-line errors."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from pathlib import Path

import onnx
import pytest

from bertrt import BertConfig, Model, Tokenizer
from bertrt.errors import BertrtError
from bertrt.onnx_info import count_ops, describe, read_model
from bertrt.serve.cli import inspect_onnx

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    config = BertConfig.preset("tiny", vocab_size=len(VOCAB), max_position_embeddings=32)
    model = Model.from_config(config, seed=0, tokenizer=Tokenizer(VOCAB))
    labelled = Model.from_config(config.with_labels(["neg", "pos", "mixed"]),
                                 head="classification", seed=1, tokenizer=Tokenizer(VOCAB))
    return {
        "ort": model.export_onnx(d / "ort.onnx", flavour="ort"),
        "standard": model.export_onnx(d / "standard.onnx", flavour="standard"),
        "classify": labelled.export_onnx(d / "classify.onnx", flavour="ort"),
    }


def _independent_counts(path: Path) -> Counter[str]:
    model = onnx.load(str(path))
    return Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node)


def _printed_counts(text: str) -> Counter[str]:
    block = text[text.index("op counts"):]
    rows = re.findall(r"^\s+(\*?)\s*([\w.]+::\w+)\s+(\d+)$", block, flags=re.M)
    # written out here, not asked of onnx_info: contrib ops and the core ops that fuse a pattern
    fused_core = {"ai.onnx::LayerNormalization", "ai.onnx::Attention", "ai.onnx::Gelu"}
    for star, key, _ in rows:
        assert (star == "*") == (key.startswith("com.microsoft::") or key in fused_core), key
    return Counter({key: int(n) for _, key, n in rows})


@pytest.mark.parametrize("flavour", ["ort", "standard"])
def test_inspect_counts_equal_onnx_load(exported, flavour):
    path = exported[flavour]
    text = inspect_onnx(path)
    expected = _independent_counts(path)
    assert _printed_counts(text) == expected
    assert count_ops(onnx.load(str(path))) == expected
    assert f"total {sum(expected.values())} nodes, {len(expected)} kinds" in text
    proto = onnx.load(str(path))
    params = sum(math.prod(t.dims) for t in proto.graph.initializer)
    assert f"{params:,} parameters in {len(proto.graph.initializer)} initializers" in text
    fused_line = next(ln for ln in text.splitlines() if ln.startswith("fused ops:"))
    ms = {k.split("::")[1]: v for k, v in expected.items() if k.startswith("com.microsoft::")}
    if flavour == "ort":
        # 2 layers: one embedding LN, 2 attentions, 2 bias-GELUs, all com.microsoft (the 4
        # skip LNs are core LayerNormalization)
        assert ms == {"EmbedLayerNormalization": 1, "Attention": 2, "BiasGelu": 2}
        assert expected["ai.onnx::LayerNormalization"] == 4
        for op, n in ms.items():
            assert f"{op} {n}" in fused_line
        assert "com.microsoft 1" in text
    else:
        assert not ms and "com.microsoft" not in text.split("metadata:")[0]


def test_inspect_shows_inputs_outputs_with_dims_and_metadata(exported):
    path = exported["ort"]
    text = inspect_onnx(path)
    proto = onnx.load(str(path))
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
        assert f"  {value.name}: " in text and f"[{', '.join(dims)}]" in text
    assert "input_ids: int64[batch, seq]" in text
    assert "last_hidden_state: float32[batch, seq, 128]" in text
    meta = {p.key: p.value for p in proto.metadata_props}
    assert f"sha256 {meta['vocab_sha256']}" in text
    assert re.search(r"config\s+layers=2 hidden=128 heads=2", text)
    assert re.search(r"flavour\s+ort", text) and re.search(r"head\s+none", text)
    info = describe(path)
    assert info.vocab_size == len(VOCAB) and info.config["max_position_embeddings"] == 32
    assert info.opset_imports["com.microsoft"] == 1


def test_inspect_shows_id2label_of_a_classifier(exported):
    text = inspect_onnx(exported["classify"])
    assert re.search(r"head\s+classification", text)
    assert '"0": "neg"' in text and '"2": "mixed"' in text
    assert "logits: float32[batch, 3]" in text


def test_metadata_is_read_defensively(exported, tmp_path):
    proto = onnx.load(str(exported["ort"]))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {"config": "{not json", "id2label": "[1, 2",
                                        "note": "hello"})
    path = tmp_path / "odd.onnx"
    onnx.save(proto, str(path))
    text = inspect_onnx(path)
    assert "config     {not json" in text and "note       hello" in text
    info = describe(path)
    assert info.config is None and info.vocab_size == len(VOCAB)  # from the embedding table


@pytest.mark.parametrize("cut", [0.003, 0.5, 0.999])
def test_truncated_file_is_a_one_line_error(exported, tmp_path, cut):
    data = exported["ort"].read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BertrtError, match="truncated or corrupt") as err:
        inspect_onnx(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_other_unreadable_files(exported, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf at all \xff\xfe" * 50)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    no_opset = tmp_path / "no_opset.onnx"
    proto = onnx.load(str(exported["standard"]))
    del proto.opset_import[:]  # parses, but the checker refuses it
    no_opset.write_bytes(proto.SerializeToString())
    for path, message in [(garbage, "truncated or corrupt"), (empty, "empty file"),
                          (no_opset, "fails the ONNX checker"),
                          (tmp_path / "missing.onnx", "no such file"),
                          (tmp_path, "not a file")]:
        with pytest.raises(BertrtError, match=message) as err:
            read_model(path)
        assert "\n" not in str(err.value)


def test_header_gives_the_file_size_in_decimal_units(exported):
    path = exported["ort"]
    size = path.stat().st_size
    assert 1e5 < size < 1e7  # the tiny model: between 100 KB and 10 MB
    expected = f"{size / 1e3:.2f}KB" if size < 1e6 else f"{size / 1e6:.2f}MB"
    first = inspect_onnx(path).splitlines()[0]
    assert first.startswith(f"{path}: ONNX model, {expected}, ")


def test_external_data_is_checked_beside_the_file(exported, tmp_path):
    proto = onnx.load(str(exported["standard"]))
    path = tmp_path / "external.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="external.data",
                    size_threshold=0)
    info = describe(path)
    assert info.external_data
    assert info.param_count == sum(math.prod(t.dims) for t in proto.graph.initializer)
    assert "+ external data" in inspect_onnx(path)
    (tmp_path / "external.data").unlink()  # the weights the checker must find are gone
    with pytest.raises(BertrtError, match="fails the ONNX checker") as err:
        read_model(path)
    assert "\n" not in str(err.value)
