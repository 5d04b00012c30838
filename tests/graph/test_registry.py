"""One place per op: every registry op has a torch lowering, an ONNX emission (once that
lowering exists) and a reference test; every lowering entry names a registry op."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from bertrt.graph.ops import REGISTRY
from bertrt.lower.to_torch import TORCH_OPS


def _reference_table() -> dict:
    path = Path(__file__).parents[1] / "lower" / "test_torch_ops.py"
    spec = importlib.util.spec_from_file_location("_bertrt_op_refs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.REFERENCES


def test_every_op_has_a_torch_lowering():
    assert set(TORCH_OPS) == set(REGISTRY)


def test_every_op_has_a_reference_test():
    assert set(_reference_table()) == set(REGISTRY)


def test_every_op_has_an_onnx_emission():
    onnx_lowering = importlib.import_module("bertrt.lower.to_onnx")
    assert set(onnx_lowering.ONNX_OPS) == set(REGISTRY)


def test_every_op_is_documented_and_has_well_formed_inputs():
    for name, op in REGISTRY.items():
        assert name.isupper() and op.name == name
        assert op.doc, f"{name} has no doc"
        optional = [i.endswith("?") for i in op.inputs]
        # optional inputs come last, except the fused embedding's token types slot
        if name != "EMBED_LAYER_NORM":
            assert optional == sorted(optional), name


def test_ir_and_onnx_lowering_load_no_torch():
    """DESIGN's layers: the IR imports neither torch nor onnx, and the ONNX lowering does not
    load torch, not even through `bertrt/__init__.py` (checked in a fresh interpreter)."""
    import subprocess

    code = ("import sys, bertrt.graph, bertrt.graph.passes, bertrt.graph.inspect; "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, 'IR'; "
            "import bertrt.lower.to_onnx; assert 'torch' not in sys.modules, 'to_onnx'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
