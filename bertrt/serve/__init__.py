"""Serving benchmark: model path -> backends, tokenizer, workload -> batcher -> report.

`bertrt serve-bench` (`bertrt.serve.cli`) is a thin layer over `benchmark_model`:

    >>> from bertrt.serve import BenchOptions, benchmark_model
    >>> report = benchmark_model("model-dir", BenchOptions(batch_sizes=[1, 8], seq_lens=[128]))

`resolve_target` does the model, tokenizer, vocabulary and workload resolution alone; the
pieces below it are public too:

    >>> from bertrt.serve import SyntheticWorkload, OrtBackend, TorchBackend, run_benchmark
    >>> report = run_benchmark(SyntheticWorkload([1, 8], [128], vocab_size=30522),
    ...                        [OrtBackend("model.onnx", threads=2), TorchBackend(model, 2)])
    >>> print(report.format_table())

Before anything is timed the backends' outputs are cross-checked (`bertrt.serve.crosscheck`);
beyond the bound the run stops with `BackendsDisagree`.
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
from bertrt.serve.bench import BenchOptions, BenchTarget, benchmark_model, resolve_target
from bertrt.serve.crosscheck import BackendsDisagree, cross_check, max_abs_diff
from bertrt.serve.report import Measurement, Report, run_benchmark
from bertrt.serve.workload import (
    Request,
    Shape,
    SyntheticWorkload,
    TextWorkload,
    Workload,
    read_texts,
)

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "BackendsDisagree", "Batch", "BenchOptions",
    "BenchTarget", "FixedBatcher", "Measurement", "OrtBackend", "OrtCudaBackend", "Report",
    "Request", "Shape", "SyntheticWorkload", "TextWorkload", "TorchBackend", "Workload",
    "benchmark_model", "cross_check", "make_backend", "max_abs_diff", "pad_batch",
    "read_texts", "resolve_target", "run_benchmark",
]
