"""Inference and the serving benchmark.

`InferenceEngine` (`bertrt.serve.engine`) is what users call: texts in, embeddings, labels
or entities out, in input order (tokenized, length-sorted, cut into batches by a token budget,
run by a backend that pads or packs each batch):

    >>> from bertrt.serve import InferenceEngine
    >>> vectors = InferenceEngine("model-dir", backend="ort").embed(["a text", "another"])

serve-bench: model path -> backends, tokenizer, workload -> batcher -> report.

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
from bertrt.serve.engine import InferenceEngine, RunStats, TruncatedWarning, token_budget_batches
from bertrt.serve.outputs import POOLINGS, PackedOutputs, PaddedOutputs, SequenceOutputs
from bertrt.serve.pooling import EmbeddingDefaults, embedding_defaults
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
    "BACKENDS", "POOLINGS", "Backend", "BackendUnavailable", "BackendsDisagree", "Batch",
    "BenchOptions", "BenchTarget", "EmbeddingDefaults", "FixedBatcher", "InferenceEngine",
    "Measurement", "OrtBackend", "OrtCudaBackend", "PackedOutputs", "PaddedOutputs", "Report",
    "Request", "RunStats", "SequenceOutputs", "Shape", "SyntheticWorkload", "TextWorkload",
    "TorchBackend", "TruncatedWarning", "Workload", "benchmark_model", "cross_check",
    "embedding_defaults", "make_backend", "max_abs_diff", "pad_batch", "read_texts",
    "resolve_target", "run_benchmark", "token_budget_batches",
]
