"""Serving benchmark: workload -> batcher -> backend -> report.

`bertrt serve-bench` (`bertrt.serve.cli`) wires these together; the Python API is the same:

    >>> from bertrt.serve import SyntheticWorkload, OrtBackend, TorchBackend, run_benchmark
    >>> report = run_benchmark(SyntheticWorkload([1, 8], [128], vocab_size=30522),
    ...                        [OrtBackend("model.onnx", threads=2), TorchBackend(model, 2)])
    >>> print(report.format_table())
"""

from bertrt.serve.backends import (
    BACKENDS,
    Backend,
    BackendUnavailable,
    OrtBackend,
    OrtCudaBackend,
    TorchBackend,
    make_backend,
)
from bertrt.serve.batcher import Batch, FixedBatcher, pad_batch
from bertrt.serve.report import Measurement, Report, max_abs_diff, run_benchmark
from bertrt.serve.workload import (
    Request,
    Shape,
    SyntheticWorkload,
    TextWorkload,
    Workload,
    read_texts,
)

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "Batch", "FixedBatcher", "Measurement",
    "OrtBackend", "OrtCudaBackend", "Report", "Request", "Shape", "SyntheticWorkload",
    "TextWorkload", "TorchBackend", "Workload", "make_backend", "max_abs_diff", "pad_batch",
    "read_texts", "run_benchmark",
]
