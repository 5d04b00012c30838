"""ONNX Runtime (CPU EP) against the torch lowering on the same weights.

fp32, both flavours, fused and as built: max abs difference < 1e-4 on every non-padded position
(DESIGN.md), on the real MiniLM-L6 and on small random configs with perturbed weights, for every
head, on a right-padded batch, batch 1 x seq 1 and the longest sequence. The model files are
written without example inputs, so every run here uses shapes the export never saw. fp16:
relative error < 1e-2 (max abs difference over the reference's max abs value).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

TOL = 1e-4
FP16_RTOL = 1e-2
VARIANTS = [("ort", True), ("ort", False), ("standard", True), ("standard", False)]
HEADS = ["none", "pretraining", "classification", "token-classification"]
#: Outputs with a (batch, seq, ...) layout, compared on non-padded positions only.
PER_TOKEN = {"last_hidden_state", "prediction_logits"}


def compare(outputs: dict[str, np.ndarray], ref: dict[str, np.ndarray], mask: np.ndarray,
            rtol: float | None = None) -> dict[str, float]:
    """Max abs difference per output (relative to the reference's max abs value with `rtol`),
    asserting the bound; returns the differences."""
    keep = mask.astype(bool)
    assert set(outputs) == set(ref), (sorted(outputs), sorted(ref))
    diffs = {}
    for name, want in ref.items():
        got = outputs[name].astype(np.float32)
        assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
        if name in PER_TOKEN:
            got, want = got[keep], want[keep]
        diff = float(np.abs(got - want).max())
        if rtol is not None:
            diff /= float(np.abs(want).max())
        diffs[name] = diff
        bound = TOL if rtol is None else rtol
        assert diff < bound, f"{name}: {'relative' if rtol else 'max abs'} diff {diff:.3g}"
    return diffs


def run(sess, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, batch)))


@pytest.mark.parametrize("flavour,fuse", VARIANTS, ids=[f"{f}-{'fused' if u else 'unfused'}"
                                                        for f, u in VARIANTS])
def test_minilm_parity(minilm, export, ort_session, reference, flavour, fuse):
    sess = ort_session(export(minilm, flavour, fuse))
    worst = 0.0
    for batch, ref in reference(minilm).values():
        worst = max(worst, *compare(run(sess, batch), ref, batch["attention_mask"]).values())
    print(f"MiniLM {flavour} fuse={fuse}: max abs diff {worst:.2e}")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("config", ["h24-n2-l2-gelu", "h32-n4-l2-gelu_new", "h48-n3-l1-relu"])
def test_random_config_parity(random_model, export, ort_session, reference, config, head):
    model = random_model(config, head)
    for flavour, fuse in VARIANTS:
        sess = ort_session(export(model, flavour, fuse))
        for case, (batch, ref) in reference(model).items():
            try:
                compare(run(sess, batch), ref, batch["attention_mask"])
            except AssertionError as exc:
                raise AssertionError(f"{flavour} fuse={fuse} {case}: {exc}") from None


@pytest.mark.parametrize("opset", [13, 20])
def test_other_opsets(random_model, export, ort_session, reference, opset):
    """opset 20 writes Gelu as one op (erf and tanh forms); opset 13 suffices for the fully
    fused ort flavour of the encoder (no core LayerNormalization left)."""
    for config in ("h24-n2-l2-gelu", "h32-n4-l2-gelu_new"):
        model = random_model(config, "none")
        flavours = ["ort"] if opset < 17 else ["ort", "standard"]
        for flavour in flavours:
            path = export(model, flavour, flavour == "ort", opset=opset)
            proto = onnx.load(path)
            assert proto.opset_import[0].version == opset
            if opset >= 20 and flavour == "standard":
                assert any(n.op_type == "Gelu" for n in proto.graph.node)
            sess = ort_session(path)
            for batch, ref in reference(model).values():
                compare(run(sess, batch), ref, batch["attention_mask"])


def test_left_padding_and_holes(random_model, ort_session, tmp_path):
    """With padding="any" the contrib Attention reads the raw 0/1 mask, so any mask works:
    compare with the torch lowering on a left-padded row and a row with holes. The default
    (right padding: per-row lengths) must differ on the left-padded row, or this test would
    not see which mask form was written."""
    import torch

    model = random_model("h32-n4-l2-gelu_new", "none")
    rng = np.random.default_rng(7)
    ids = rng.integers(0, model.config.vocab_size, (3, 9), dtype=np.int64)
    mask = np.ones((3, 9), dtype=np.int64)
    mask[0, :4] = 0
    mask[1, [2, 5, 6]] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    with torch.no_grad():
        out = model.to_torch().eval()(**{k: torch.from_numpy(v) for k, v in batch.items()})
    ref = {k: v.numpy() for k, v in out.items()}
    for i, (flavour, fuse) in enumerate(VARIANTS):
        path = model.export_onnx(tmp_path / f"any{i}.onnx", flavour=flavour, fuse=fuse,
                                 padding="any")
        compare(run(ort_session(path), batch), ref, mask)
    lengths = run(ort_session(model.export_onnx(tmp_path / "right.onnx")), batch)
    row = mask[0].astype(bool)
    diff = np.abs(lengths["last_hidden_state"][0][row] - ref["last_hidden_state"][0][row]).max()
    assert diff > 1e-3


@pytest.mark.parametrize("flavour", ["ort", "standard"])
def test_minilm_fp16_runs_on_cpu(minilm, export, ort_session, reference, flavour):
    """ONNX Runtime 1.32's CPU EP runs every op of both flavours in fp16 (EmbedLayerNorm,
    Attention, SkipLayerNorm, BiasGelu, LayerNormalization, MatMul, Erf, Softmax)."""
    sess = ort_session(export(minilm, flavour, True, fp16=True))
    for batch, ref in reference(minilm).values():
        outputs = run(sess, batch)
        assert all(v.dtype == np.float16 for v in outputs.values())
        diffs = compare(outputs, ref, batch["attention_mask"], rtol=FP16_RTOL)
    print(f"MiniLM fp16 {flavour}: relative diffs {diffs}")


@pytest.mark.parametrize("flavour,fuse", VARIANTS[:1] + VARIANTS[3:])
def test_random_fp16_pretraining(random_model, export, ort_session, reference, flavour, fuse):
    model = random_model("h24-n2-l2-gelu", "pretraining")
    sess = ort_session(export(model, flavour, fuse, fp16=True))
    for batch, ref in reference(model).values():
        compare(run(sess, batch), ref, batch["attention_mask"], rtol=FP16_RTOL)
