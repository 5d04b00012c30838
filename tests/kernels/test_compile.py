"""Every kernel source compiles with nvcc for the GPUs training targets, warnings as errors.

NVRTC compiles the same sources at run time on a GPU machine; this is the check that runs
without one. `-DBERTRT_NVCC_CHECK` turns on each file's explicit template instantiations
(nvcc compiles a template's body only when instantiated).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bertrt.kernels.cuda import KERNELS_DIR

SOURCES = sorted(KERNELS_DIR.rglob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def test_every_fused_op_has_a_source():
    """The glob below finds the kernels (an empty parametrization would pass vacuously)."""
    names = {p.stem for p in SOURCES}
    assert {"skip_layer_norm", "bias_gelu", "embed_layer_norm"} <= names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=[str(p.relative_to(KERNELS_DIR))
                                                 for p in SOURCES])
def test_compiles(source: Path, arch: str, tmp_path: Path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    cmd = [nvcc, f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings",
           "-DBERTRT_NVCC_CHECK", f"-I{KERNELS_DIR}", "--cubin", "-o",
           str(tmp_path / "out.cubin"), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"
