"""CuPy plumbing shared by the kernels: when a kernel runs, how its source is compiled, and how
it is launched on torch's stream.

* `wants_kernel(*tensors)`: every tensor is on CUDA, CuPy imports, and kernels are not switched
  off (`use_kernels(False)`, or `BERTRT_KERNELS=reference` in the environment). Otherwise the
  op's pure-torch reference runs. CuPy is imported only here, and only when a CUDA tensor asks.
* `module(path)`: an `<op>.cu` compiled by NVRTC (CuPy's `RawModule`), with `common.cuh` on the
  include path; CuPy caches the binary on disk (`~/.cupy/kernel_cache`) and this module keeps
  it per process.
* `launch(...)`: on torch's current stream of the tensors' device, with pointers
  (`data_ptr()`) rather than DLPack, since CuPy has no bfloat16 dtype.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The folder of `common.cuh`, passed to NVRTC and to nvcc as an include path.
KERNELS_DIR = Path(__file__).resolve().parent
#: The environment switch: `reference` runs every op's pure-torch reference, CUDA included.
ENV_SWITCH = "BERTRT_KERNELS"
#: NVRTC options: C++17 and the include path (IEEE division and square roots, the default).
NVRTC_OPTIONS = ("-std=c++17", f"-I{KERNELS_DIR}")

#: The C type of each torch dtype the kernels take, for template instantiation.
CTYPES = {torch.float32: "float", torch.bfloat16: "bf16_t", torch.float16: "f16_t"}

_enabled = os.environ.get(ENV_SWITCH, "auto").lower() != "reference"


def kernels_enabled() -> bool:
    """Whether CUDA tensors run the CuPy kernels (True unless switched off)."""
    return _enabled


@contextlib.contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Within the block, CUDA tensors run the kernels (True) or the references (False)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


@functools.cache
def cupy_available() -> bool:
    """CuPy is installed and a CUDA device is visible (looked up once per process)."""
    return importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()


def wants_kernel(*tensors: torch.Tensor | None) -> bool:
    """Whether an op on these tensors (None entries ignored) runs its CuPy kernel."""
    present = [t for t in tensors if t is not None]
    return (_enabled and bool(present) and all(t.is_cuda for t in present)
            and cupy_available())


def ctype(dtype: torch.dtype) -> str:
    """The kernels' C type for `dtype`; a one-line error for a dtype they do not take."""
    try:
        return CTYPES[dtype]
    except KeyError:
        raise TypeError(f"the CUDA kernels take float32, bfloat16 or float16 tensors, "
                        f"not {dtype}") from None


@functools.cache
def module(source: Path, name_expressions: tuple[str, ...] = ()) -> Any:
    """`source` (an `<op>.cu`) compiled by NVRTC, with the template instances named."""
    import cupy

    return cupy.RawModule(code=source.read_text(), options=NVRTC_OPTIONS,
                          name_expressions=name_expressions or None)


def pointer(tensor: torch.Tensor | None) -> np.uint64:
    """A tensor's device address as a kernel argument (0 for None: an absent optional)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def launch(source: Path, name: str, grid: int | Sequence[int], block: int | Sequence[int],
           args: Sequence[Any], *, device: torch.device, shared_mem: int = 0,
           name_expressions: tuple[str, ...] = ()) -> None:
    """Run kernel `name` of `source` on torch's current stream of `device`.

    `args` are the kernel's parameters in order: `pointer(t)` for tensors, numpy scalars
    (`np.int64`, `np.float32`, ...) for the rest, each matching the C signature's width.
    `name_expressions` lists every template instance the module must hold (`name` among them).
    """
    import cupy

    grid = (grid,) if isinstance(grid, int) else tuple(grid)
    block = (block,) if isinstance(block, int) else tuple(block)
    with cupy.cuda.Device(device.index if device.index is not None else 0):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        kernel = module(source, name_expressions).get_function(name)
        kernel(grid, block, tuple(args), stream=stream, shared_mem=shared_mem)


def require_contiguous(**tensors: torch.Tensor | None) -> None:
    """A one-line error naming the first tensor that is not contiguous (kernels index rows)."""
    for name, tensor in tensors.items():
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"{name}: the CUDA kernel needs a contiguous tensor "
                             f"(got strides {tuple(tensor.stride())})")
