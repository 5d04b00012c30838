"""One place per op: op kinds are an enum checked against the registry and every lowering table
on import; an unknown op fails loudly; every op has a reference test and a documented, well-formed
definition."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from bertrt.graph import Graph, GraphError
from bertrt.graph.ops import REGISTRY, Op, OpDef, check_table, get_op
from bertrt.graph.passes.base import producer


def _reference_table() -> dict:
    path = Path(__file__).parents[1] / "lower" / "test_torch_ops.py"
    spec = importlib.util.spec_from_file_location("_bertrt_op_refs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.REFERENCES


def test_every_op_has_a_reference_test():
    assert set(_reference_table()) == set(Op)


def test_a_lowering_table_missing_an_op_fails_its_check():
    table = {op: None for op in Op if op is not Op.SOFTMAX}
    with pytest.raises(GraphError, match=r"missing \['SOFTMAX'\]"):
        check_table(table, "test")
    with pytest.raises(GraphError, match="not ops"):
        check_table({**table, Op.SOFTMAX: None, "SOFTMAXX": None}, "test")


def test_unknown_ops_are_errors_not_silent_misses():
    g = Graph("g")
    with pytest.raises(GraphError, match="unknown op 'SPLIT_HEAD'"):
        g.op("SPLIT_HEAD")
    with pytest.raises(GraphError, match="unknown op"):
        producer(None, "SPLIT_HEAD")  # a typo in a pass fails instead of never matching
    with pytest.raises(GraphError, match="is not a member of Op"):
        OpDef("NEW_OP", ("x",), lambda types, attrs: [])
    assert get_op("LINEAR") is REGISTRY[Op.LINEAR]  # strings name members exactly


def test_every_op_is_documented_and_has_well_formed_inputs():
    for name, op in REGISTRY.items():
        assert op.name is name and op.doc, name
        optional = [i.endswith("?") for i in op.inputs]
        # optional inputs come last, except the fused embedding's token types slot
        if name is not Op.EMBED_LAYER_NORM:
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
