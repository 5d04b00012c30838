"""`tools/gpu_check.py --dry-run` on the CPU: it builds the models, trains, times, computes FLOPs
and MFU and writes both files, with numbers that agree with each other; and the markdown of a
full (GPU) report, from a report of that shape."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    return report, (out / "gpu_check.md").read_text(), done.stdout


def test_every_section_runs_and_progress_is_timestamped(dry_run) -> None:
    report, _, stdout = dry_run
    assert report["meta"]["dry_run"] is True and report["failures"] == []
    assert set(report["sections"]) == {"kernels", "loss_curves", "pretraining", "inference"}
    assert all(s["status"] == "ok" for s in report["sections"].values()), report["sections"]
    assert report["kernel_tests"]["result"] == "skipped (dry run)"
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert lines and all(line[1:].split("s]")[0].strip().replace(".", "").isdigit()
                         for line in lines)


def test_the_numbers_agree_with_each_other(dry_run) -> None:
    report, _, _ = dry_run
    curves = report["loss_curves"]
    assert len(curves["reference"]) == curves["steps"] == 2
    assert all(math.isfinite(x) and x > 0 for x in curves["reference"])
    pre = report["pretraining"]
    tokens = pre["batch"] * pre["seq"]
    assert pre["peak_flops"] > 0 and pre["model_flops_per_step"] > 0
    assert "bertrt (references)" in pre["systems"]
    for name, s in pre["systems"].items():
        seconds = s["step_ms"] / 1e3
        assert s["tokens_per_s"] == pytest.approx(tokens / seconds, rel=1e-9), name
        assert s["achieved_flops"] == pytest.approx(pre["model_flops_per_step"] / seconds,
                                                    rel=1e-9), name
        assert s["mfu"] == pytest.approx(s["achieved_flops"] / pre["peak_flops"], rel=1e-9)
        assert s["step_ms_min"] <= s["step_ms"]
    if "transformers (sdpa)" in pre["systems"]:
        hf = pre["systems"]["transformers (sdpa)"]
        # transformers runs the MLM head on every position: more executed than model FLOPs
        assert hf["executed_flops_per_step"] > pre["model_flops_per_step"]
        for name, ratio in pre["speedup_vs_transformers"].items():
            assert ratio == pytest.approx(pre["systems"][name]["tokens_per_s"]
                                          / hf["tokens_per_s"], rel=1e-9)
    shapes = report["inference"]["shapes"]
    assert set(shapes) == {"1x16", "2x16"}
    for row in shapes.values():
        assert {"bertrt padded", "bertrt packed"} <= set(row["ms"])
        assert row["outputs_agree"] and row["max_abs_diff"]["bertrt packed"] < 1e-4  # fp32


def test_the_markdown_holds_the_tables(dry_run) -> None:
    report, md, _ = dry_run
    assert md.startswith("### GPU check: CPU") and "(dry run)" in md
    assert f"torch {report['meta']['versions']['torch']}" in md
    assert "| system | step ms | tokens/s | MFU | vs transformers |" in md
    assert "| bertrt (references) |" in md and "| 1x16 |" in md


def test_the_markdown_of_a_full_report() -> None:
    gpu_check = _module()
    system = {"step_ms": 100.0, "tokens_per_s": 81920.0, "mfu": 0.45}
    report = {
        "meta": {"device_name": "NVIDIA H200", "dry_run": False, "date": "today",
                 "seconds": 300.0, "versions": {"torch": "2.11", "cuda": "13.0",
                                                "cupy-cuda13x": "14.0", "transformers": "5"}},
        "kernel_tests": {"result": "pass (120 passed)"},
        "loss_curves": {"steps": 30, "max_abs_diff": 1e-3, "max_rel_diff": 1e-4,
                        "rtol": 2e-2, "passed": True},
        "pretraining": {"batch": 64, "seq": 128, "masked_per_batch": 1216,
                        "peak_flops": 7e14, "peak_dtype": "torch.bfloat16",
                        "systems": {"bertrt (kernels)": system,
                                    "transformers (sdpa)": {**system, "step_ms": 200.0}},
                        "speedup_vs_transformers": {"bertrt (kernels)": 2.0}},
        "failures": ["inference outputs disagree at 1x128"],
    }
    md = gpu_check.markdown(report)
    assert "NVIDIA H200" in md and "cupy-cuda13x 14.0" in md and "CUDA 13.0" in md
    assert "kernels vs float64 references: pass (120 passed)" in md
    assert "max rel diff 1.00e-04 (bound 0.02): pass" in md
    assert "| bertrt (kernels) | 100.0 | 81,920 | 45.0% | 2.00x |" in md
    assert "Failures: inference outputs disagree at 1x128" in md
