"""Backends: one interface over the runtimes serve-bench compares.

A backend has a `name`, a one-line `description`, and runs a batch in two steps:
`prepare(batch)` turns the (B, S) int64 inputs of a `Batch` into what its runtime takes (feed
dicts in the declared dtypes, an IO binding, tensors), untimed; `execute(prepared) -> outputs`
is the call serve-bench times, and returns the model's named outputs as numpy arrays on the
host. `run(batch)` does both; `close()` releases the runtime. A new backend implements
`execute` (and `prepare` when it has inputs to convert).

The inference engine (`bertrt.serve.engine`) hands a backend unpadded sequences instead:
`run_sequences(requests) -> SequenceOutputs`. The base class pads them to the longest and
calls `run`; a padding-free backend has `packed` true (its batches then cost their real
tokens, not B × S) and feeds the packed layout: `input_ids`, `token_type_ids` (T,) and
`cu_seqlens` (B+1,). `OrtBackend` is packed when its file is a packed export
(`export_onnx(packed=True)`); `TorchBackend(..., packed=True)` runs the packed torch lowering.

- `OrtBackend`: ONNX Runtime, CPU execution provider, a fixed number of intra-op threads.
- `OrtCudaBackend`: ONNX Runtime's CUDA execution provider with IO binding (inputs bound, and
  so copied to the device, in `prepare`; outputs bound on the device and copied back once).
- `OpenVinoBackend`: OpenVINO's CPU plugin on bertrt's `standard` export, at f32 or (on a CPU
  with native bf16) bf16 inference precision.
- `TorchBackend`: bertrt's torch lowering, eager, under `torch.inference_mode`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bertrt.errors import BertrtError
from bertrt.graph.ir import SEQ
from bertrt.padding import pack_rows
from bertrt.serve.batcher import pad_batch
from bertrt.serve.outputs import PackedOutputs, PaddedOutputs, SequenceOutputs
from bertrt.serve.workload import Request

if TYPE_CHECKING:
    from bertrt.model import Model

#: Backend names serve-bench accepts.
BACKENDS: tuple[str, ...] = ("ort", "ort-cuda", "openvino", "torch")
#: Those that run an .onnx file.
ONNX_BACKENDS = frozenset({"ort", "ort-cuda", "openvino"})
#: The ONNX flavour each ONNX backend runs best (OpenVINO does not read com.microsoft ops).
FLAVOURS = {"ort": "ort", "ort-cuda": "ort", "openvino": "standard"}

INSTALL_HINT = "install bertrt[cpu] (or bertrt[gpu] for CUDA)"


#: A variant's modifiers (`ort:packed:int8`): the layout, and the precision.
LAYOUTS = ("packed", "padded")
VARIANT_PRECISIONS = ("fp32", "int8", "bf16", "fp16")


@dataclass(frozen=True)
class Variant:
    """A backend and how it runs: `NAME[:packed|:padded][:fp32|:int8|:bf16|:fp16]`, e.g.
    `ort:packed:int8` (ONNX Runtime on the packed int8 export), `openvino:bf16`.

    `packed` None and `precision` None: as the `.onnx` file is (a model dir exports padded
    fp32). The precisions each backend runs: `bertrt.serve.selection.RUNS`.
    """

    backend: str
    packed: bool | None = None
    precision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """Raises BertrtError: an unknown backend or modifier, or one the backend cannot run."""
        from bertrt.serve.selection import RUNS

        name, *mods = [part.strip() for part in spec.split(":")]
        if name not in BACKENDS:
            raise BertrtError(f"--backend: {name!r} is unknown; expected one of "
                              f"{', '.join(BACKENDS)} (with :packed, :padded, :int8, :bf16 "
                              "or :fp16 after it)")
        packed, precision = None, None
        for mod in mods:
            if mod in LAYOUTS:
                packed = mod == "packed"
            elif mod in VARIANT_PRECISIONS:
                precision = mod
            else:
                raise BertrtError(f"--backend {spec}: {mod!r} is not a modifier; expected "
                                  f"{', '.join(LAYOUTS + VARIANT_PRECISIONS)}")
        if precision is not None and precision not in RUNS[name]:
            raise BertrtError(f"--backend {spec}: {name} runs {', '.join(RUNS[name])}, not "
                              f"{precision}")
        return cls(name, packed, precision)

    @property
    def label(self) -> str:
        """The spec in its canonical form (the report's name for it)."""
        layout = {None: "", True: ":packed", False: ":padded"}[self.packed]
        return self.backend + layout + ("" if self.precision is None else
                                        f":{self.precision}")


class BackendUnavailable(Exception):
    """A backend cannot run on this machine (e.g. no CUDA); serve-bench skips it."""


def import_onnxruntime() -> Any:
    """`onnxruntime`, or a one-line `BertrtError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise BertrtError(f"onnxruntime is not installed; {INSTALL_HINT}") from None
    return onnxruntime


def import_openvino() -> Any:
    """`openvino`, or a one-line `BackendUnavailable` saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("openvino is not installed; install bertrt[openvino]"
                                 ) from None
    return openvino


def native_bf16(core: Any = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as OpenVINO's CPU plugin
    reports it (`OPTIMIZATION_CAPABILITIES` lists "BF16")."""
    if core is None:
        core = import_openvino().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class Backend:
    """The interface every backend implements."""

    name: str = "backend"
    description: str = ""
    _label: str = ""
    #: Computes float32 with fewer mantissa bits (fp16 weights, or TF32 matrix products):
    #: the cross-check then holds it to a relative bound instead of the fp32 absolute one.
    reduced_precision: bool = False
    #: Runs sequences without padding: a batch costs its real tokens, not B × S.
    packed: bool = False
    #: What it computes in: "fp32", "int8", "fp16" (the file's), "bf16" (OpenVINO's hint).
    precision: str = "fp32"
    #: A padded twin of a packed backend (the same model, exported padded) that runs the
    #: batches of one sequence: they have no padding to skip, and the padded graph has no
    #: packing gathers (the engine sets it; `close` closes it too).
    single: Backend | None = None
    #: The same model run on one core per call (`narrowed`): a server runs several batches
    #: on it at once under load, one per core, where one batch on every core would wait at
    #: each op for its slowest thread (the engine's `streams` sets it; `close` closes it
    #: too).
    narrow: Backend | None = None
    #: The engine's default budget of positions per batch on this backend. On CPU, small
    #: batches keep the activations in cache: MiniLM embeds ~1.8x faster at 2048 than at
    #: 16384 (2 threads, real text); OpenVINO is best at 1-2k (`OrtBackend`: 512).
    batch_tokens: int = 2048

    def narrowed(self, streams: int) -> Backend | None:
        """A backend of the same model for `streams` threads calling it at once, each run
        on one core (what `narrow` holds); None: this backend has none."""
        return None

    @property
    def label(self) -> str:
        """What reports call it: `name`, or the variant it runs (`ort:packed:int8`)."""
        return self._label or self.name

    @label.setter
    def label(self, value: str) -> None:
        self._label = value

    def prepare(self, batch: dict[str, np.ndarray]) -> Any:
        """What `execute` takes for a batch of (B, S) inputs (untimed); the batch itself here
        (packed, for a packed backend: see `layout`)."""
        return self.layout(batch)

    def layout(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` in the layout this backend runs: a padded batch (with `attention_mask`)
        given to a packed backend becomes its real tokens one after another (`unpad`)."""
        if self.packed and "attention_mask" in batch:
            return unpad(batch)
        return batch

    def execute(self, prepared: Any) -> dict[str, np.ndarray]:
        """Outputs (e.g. `last_hidden_state`, `pooler_output`) of a prepared batch: the timed
        call."""
        raise NotImplementedError

    #: Every output the model has, in its order.
    output_names: Sequence[str] = ()
    #: The outputs `execute` returns (None: all of `output_names`); see `read_only`.
    reads: frozenset[str] | None = None
    #: `output_names` less those `read_only` dropped, in the model's order.
    fetched: Sequence[str] = ()

    def read_only(self, names: Collection[str]) -> None:
        """Return only the outputs named (those the model has; its twin's too): what the
        engine reads. ONNX Runtime then skips the nodes only the others need (an encoder's
        pooler: ~7% of a 16-token MiniLM query); the other runtimes drop them after the run.

        Raises:
            BertrtError: the model has none of `names`.
        """
        kept = frozenset(names) & set(self.output_names)
        if not kept:
            raise BertrtError(f"the model has none of the outputs {sorted(names)} (it has "
                              f"{', '.join(self.output_names)})")
        self.reads = kept
        self.fetched = [name for name in self.output_names if name in kept]
        if self.single is not None:
            self.single.read_only(kept)

    def _wanted(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`outputs` less those `read_only` dropped."""
        if self.reads is None:
            return outputs
        return {name: value for name, value in outputs.items() if name in self.reads}

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for a batch of (B, S) inputs: `execute(prepare(batch))`."""
        return self.execute(self.prepare(batch))

    def run_sequences(self, requests: Sequence[Request], pad_id: int = 0) -> SequenceOutputs:
        """Outputs of unpadded sequences, per sequence, run as one batch: packed when the
        backend is (`_run_packed`), else padded to the longest (right padding with `pad_id`,
        mask 0).

        Args:
            requests: At least one sequence (ids and type ids, (L,) each, L >= 1).
            pad_id: The tokenizer's `[PAD]` id.
        """
        if self.single is not None and len(requests) == 1:
            return self.single.run_sequences(requests, pad_id)
        if self.packed:
            return self._run_packed(requests)
        batch = pad_batch(requests, pad_id)
        return PaddedOutputs.from_batch(self.run(batch.inputs), batch.lengths,
                                        self.token_outputs)

    def _run_packed(self, requests: Sequence[Request]) -> SequenceOutputs:
        """`run` on the packed layout of `requests` (for a backend whose model is packed)."""
        ids, cu = pack_rows([r.input_ids for r in requests])
        types, _ = pack_rows([r.token_type_ids for r in requests])
        outputs = self.run({"input_ids": ids, "token_type_ids": types, "cu_seqlens": cu})
        return PackedOutputs.from_batch(outputs, cu, self.token_outputs)

    #: Names of the per-token outputs, (B, S, ...) padded or (T, ...) packed (None: those of
    #: rank 3 padded, those with T rows packed).
    token_outputs: frozenset[str] | None = None

    def close(self) -> None:
        """Release the runtime's resources."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NP_OF_ORT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OrtBackend(Backend):
    """ONNX Runtime on the CPU execution provider.

    Args:
        path: The `.onnx` file.
        threads: Intra-op threads (None: ONNX Runtime's default, one per core).
        spinning: Let idle pool threads spin (faster alone; set False when other runtimes
            share the cores in the same process).
        yield_cores: Stop spinning when a run ends (spin only between its ops): for a process
            whose other threads need the cores between runs (a server's HTTP and
            tokenization).
    """

    name = "ort"
    providers: list[Any] = ["CPUExecutionProvider"]
    #: MiniLM on real text, 2 threads, AMD EPYC (seq/s at budgets 256/512/1024/2048): packed
    #: fp32 243/254/239/216, packed int8 472/564/515/472, padded fp32 -/249/250/221.
    batch_tokens = 512
    #: ONNX Runtime rewrites the session may not make. Add + LayerNormalization on (B, S, H)
    #: stays as it is: the CPU provider's SkipLayerNormalization kernel is slower (MiniLM on
    #: one thread runs 1.07-1.09x faster without it, `tools/bench_layer_norm.py`;
    #: `bertrt.lower.to_onnx` writes the core form for this reason).
    disabled_optimizers: tuple[str, ...] = ("SkipLayerNormFusion",)

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 spinning: bool = True, yield_cores: bool = False) -> None:
        ort = import_onnxruntime()
        self.path = Path(path)
        self._check_provider(ort)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or 0)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the report is the output
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif yield_cores:  # spin between a run's ops, not after it: the cores go back to
            # the process's other threads between runs (bertrt serve, MiniLM, 16 clients:
            # ~1.2x the requests/s of spinning on, at the same light-load latency; spinning off
            # entirely: +40% p50 there); a lone caller's back-to-back queries lose ~6%, and a
            # query after an idle gap ~40% (the engine leaves it off where streams take the
            # load)
            options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=self.providers,
                disabled_optimizers=list(self.disabled_optimizers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            line = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise BertrtError(f"{self.path}: onnxruntime cannot load it ({line.strip()[:300]})"
                              ) from None
        self.input_types = {i.name: _NP_OF_ORT.get(i.type, np.int64)
                            for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fetched = self.output_names
        #: A packed export: (tokens,) inputs and cu_seqlens; its per-token outputs' first
        #: axis is the symbolic `tokens` (padded: their second is `seq`).
        self.packed = "cu_seqlens" in self.input_types
        self.token_outputs = frozenset(
            o.name for o in self.session.get_outputs()
            if o.shape and (o.shape[0] == "tokens" or o.shape[1:2] == ["seq"]))
        self.reduced_precision = self.reduced_precision or self._computes_fp16()
        from bertrt.onnx_info import file_precision

        self.precision = ("fp16" if self._computes_fp16() else
                          file_precision(self.session.get_modelmeta().custom_metadata_map))
        self.reduced_precision = self.reduced_precision or self.precision != "fp32"
        self.threads = threads
        self.description = (f"onnxruntime {ort.__version__} "
                            f"{self.session.get_providers()[0]}, "
                            f"{threads or 'default'} intra-op threads")

    def _check_provider(self, ort: Any) -> None:
        pass

    def _computes_fp16(self) -> bool:
        """Whether the model computes in float16 (an `--fp16` export: its outputs are)."""
        return any(o.type == "tensor(float16)" for o in self.session.get_outputs())

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feed dict (see `feeds`)."""
        return self.feeds(batch)

    def feeds(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's arrays the model takes, in the dtypes it declares."""
        return typed_inputs(self.path, self.input_types, self.layout(batch))

    def narrowed(self, streams: int) -> Backend | None:
        """A single-thread session of the same file, which the streams share (one thread has
        no pool to spin or stop)."""
        return OrtBackend(self.path, threads=1)

    def execute(self, prepared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.fetched, self.session.run(self.fetched, prepared)))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class OrtCudaBackend(OrtBackend):
    """ONNX Runtime on the CUDA execution provider, with IO binding.

    Raises:
        BackendUnavailable: this onnxruntime build has no `CUDAExecutionProvider`, or the
            session fell back to the CPU (no usable GPU).
    """

    name = "ort-cuda"
    providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    #: ONNX Runtime's CUDA provider allows TF32 matrix products by default (`use_tf32`).
    reduced_precision = True
    #: A GPU wants large batches.
    batch_tokens = 16384
    #: Not measured on a GPU, where the fused SkipLayerNormalization is one kernel for three:
    #: ONNX Runtime's fusions stay on.
    disabled_optimizers = ()

    def narrowed(self, streams: int) -> Backend | None:
        return None  # a GPU runs one batch at a time

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 spinning: bool = True, yield_cores: bool = False) -> None:
        super().__init__(path, threads, spinning, yield_cores)
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable("onnxruntime could not start its CUDA execution provider "
                                     "(no usable GPU?)")

    def _check_provider(self, ort: Any) -> None:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "this onnxruntime has no CUDAExecutionProvider (install bertrt[gpu] on a "
                "machine with CUDA)")

    def prepare(self, batch: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]]:
        """An IO binding of the batch (and the host arrays it was bound from, kept alive)."""
        feeds = self.feeds(batch)
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)  # one host-to-device copy per input
        for name in self.fetched:
            binding.bind_output(name, "cuda", 0)  # stays on the device until copied back
        return binding, feeds

    def execute(self, prepared: tuple[Any, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        binding, _ = prepared
        self.session.run_with_iobinding(binding)
        return dict(zip(self.fetched, binding.copy_outputs_to_cpu()))


class OpenVinoBackend(Backend):
    """OpenVINO's CPU plugin on an `.onnx` file of bertrt's `standard` flavour, padded or
    packed (its dynamic shapes take any T; see docs/inference.md for what a new shape costs).

    Args:
        path: The `.onnx` file (standard flavour: OpenVINO does not read com.microsoft ops).
        threads: Inference threads (None: OpenVINO's default, one per core).
        precision: "fp32" (OpenVINO's f32 inference precision, set explicitly: on a CPU with
            native bf16 its default is bf16) or "bf16" (matrix products and most of the rest
            in bf16; only where the CPU has native bf16, else `BackendUnavailable`).
        streams: None: one stream, a run on every thread (the latency hint). N: OpenVINO's
            streams, N of one thread each, and a run on one of them: the narrow backend of a
            server's streams (`Backend.narrow`), which N threads call at once (each thread
            runs on an infer request of its own).

    Raises:
        BackendUnavailable: openvino is not installed, or bf16 on a CPU without native bf16.
        BertrtError: OpenVINO cannot read or compile the file.
    """

    name = "openvino"
    _HINTS = {"fp32": "f32", "bf16": "bf16"}

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 precision: str = "fp32", streams: int | None = None) -> None:
        ov = import_openvino()
        if precision not in self._HINTS:
            raise BertrtError(f"backend openvino runs fp32 or bf16, not {precision}")
        self.path = Path(path)
        core = ov.Core()
        if precision == "bf16" and not native_bf16(core):
            raise BackendUnavailable("this CPU has no native bf16 (AVX-512 BF16 or AMX), "
                                     "where OpenVINO would emulate it slower than fp32")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self._HINTS[precision]}
        if streams:
            config.update(NUM_STREAMS=int(streams), INFERENCE_NUM_THREADS=int(streams))
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"  # one stream: a batch uses every thread
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line trace
            line = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise BertrtError(f"{self.path}: openvino cannot compile it ({line.strip()[:300]})"
                              ) from None
        # an infer request holds its run's state: one per calling thread (a server's engine
        # threads, and its event loop for a lone request)
        self._requests = threading.local()
        # a port may carry several tensor names (e.g. cu_seqlens and a Cast's output): each
        # is named by the ONNX graph's own input or output name
        graph = _onnx_graph(self.path)
        inputs = {i.name for i in graph.input}
        self.inputs = {_port_name(port, inputs): port for port in self.compiled.inputs}
        self.input_types = {name: port.get_element_type().to_dtype()
                            for name, port in self.inputs.items()}
        outputs = {o.name for o in graph.output}
        self.outputs = {_port_name(port, outputs): port for port in self.compiled.outputs}
        self.output_names = list(self.outputs)
        self.packed = "cu_seqlens" in self.input_types
        self.token_outputs = _token_outputs(graph) if self.packed else None
        self.precision = precision
        self.reduced_precision = precision != "fp32"
        self.threads = threads
        self.description = (f"openvino {ov.__version__.split('-')[0]} CPU, {precision}, "
                            + (f"{streams} streams of 1 thread" if streams
                               else f"{threads or 'default'} threads"))

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[Any, np.ndarray]:
        feeds = typed_inputs(self.path, self.input_types, self.layout(batch))
        return {self.inputs[name]: array for name, array in feeds.items()}

    def narrowed(self, streams: int) -> Backend | None:
        """The model compiled again to `streams` OpenVINO streams of one thread."""
        return OpenVinoBackend(self.path, precision=self.precision, streams=streams)

    def execute(self, prepared: dict[Any, np.ndarray]) -> dict[str, np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        result = request.infer(prepared)  # copies the outputs out of the request
        return self._wanted({name: result[port] for name, port in self.outputs.items()})

    def close(self) -> None:
        self._requests = threading.local()
        self.compiled = None


def _onnx_graph(path: Path) -> Any:
    """The graph of an `.onnx` file (its names and dims; weights are not needed)."""
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def _port_name(port: Any, names: set[str]) -> str:
    """The one of an OpenVINO port's tensor names that the ONNX graph gave it."""
    return next(iter(port.get_names() & names), port.get_any_name())


def _token_outputs(graph: Any) -> frozenset[str]:
    """The outputs of a packed graph whose first axis is the symbolic `tokens`."""
    return frozenset(o.name for o in graph.output
                     if o.type.tensor_type.shape.dim
                     and o.type.tensor_type.shape.dim[0].dim_param == "tokens")


class TorchBackend(Backend):
    """bertrt's torch lowering of a model, eager, CPU, under `torch.inference_mode`.

    Args:
        model: The model (its own head).
        threads: torch intra-op threads (process-wide; restored by `close`).
        skip_mlm: For a pretraining head, run the MLM head on no positions (its
            `prediction_logits` come back (0, V)): what an engine that only reads hidden states
            wants, since the (B, S, V) logits cost more than the encoder.
        packed: Run the packed (padding-free) lowering: batches are `input_ids`,
            `token_type_ids` (T,) and `cu_seqlens` (B+1,) (`run_sequences` makes them).
    """

    name = "torch"

    def __init__(self, model: Model, threads: int | None = None, skip_mlm: bool = False,
                 packed: bool = False) -> None:
        import torch

        self._torch = torch
        self._old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        self.packed = packed
        self.module = model.to_torch(packed=packed).eval()
        self.output_names = list(model.graph.outputs)
        self.token_outputs = frozenset(name for name, value in model.graph.outputs.items()
                                       if SEQ in value.shape)
        self.module.check_inputs = False  # ids are valid by construction; skip the reductions
        self._no_positions = (torch.zeros(0, dtype=torch.int64)
                              if skip_mlm and model.head == "pretraining" else None)
        self.description = (f"bertrt {'packed ' if packed else ''}torch lowering, torch "
                            f"{torch.__version__}, eager, {torch.get_num_threads()} threads")

    def prepare(self, batch: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
        """The three inputs as tensors sharing the arrays' memory (no copies): ids, mask and
        type ids; packed, ids, cu_seqlens and type ids."""
        from_numpy = self._torch.from_numpy
        batch = self.layout(batch)
        second = batch["cu_seqlens" if self.packed else "attention_mask"]
        return (from_numpy(batch["input_ids"]), from_numpy(second),
                from_numpy(batch["token_type_ids"]))

    def execute(self, prepared: tuple[Any, Any, Any]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            out = self.module(*prepared, masked_positions=self._no_positions)
        return self._wanted({name: value.numpy() for name, value in out.items()})

    def close(self) -> None:
        self._torch.set_num_threads(self._old_threads)


def typed_inputs(path: Path, types: dict[str, Any], batch: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """The arrays of `batch` a model file declares (`types`: name -> numpy dtype), contiguous
    and in those dtypes.

    Raises:
        BertrtError: the model wants an input the batch does not have.
    """
    missing = [name for name in types if name not in batch]
    if missing:
        raise BertrtError(f"{path}: the model wants input(s) {missing}, which were not given")
    return {name: np.ascontiguousarray(batch[name], dtype=dtype)
            for name, dtype in types.items()}


def unpad(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A padded batch ((B, S) arrays and `attention_mask`, right-padded) as the packed layout:
    `input_ids` and `token_type_ids` (T,) of its real tokens, row after row, and
    `cu_seqlens` (B+1,) int32."""
    keep = np.asarray(batch["attention_mask"]).astype(bool)
    lengths = keep.sum(axis=1)
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return {"input_ids": batch["input_ids"][keep],
            "token_type_ids": batch["token_type_ids"][keep], "cu_seqlens": cu}


def repad(outputs: dict[str, np.ndarray], attention_mask: np.ndarray,
          token_outputs: Sequence[str] | frozenset[str] | None) -> dict[str, np.ndarray]:
    """A packed batch's outputs in the padded layout of `attention_mask` (B, S): per-token
    outputs (T, ...) scattered to (B, S, ...), zeros at padded positions; the rest as they
    are. `token_outputs` None: those with T rows."""
    keep = np.asarray(attention_mask).astype(bool)
    tokens = int(keep.sum())
    out = {}
    for name, value in outputs.items():
        per_token = (name in token_outputs if token_outputs is not None
                     else value.ndim >= 1 and value.shape[0] == tokens)
        if per_token:
            full = np.zeros(keep.shape + value.shape[1:], dtype=value.dtype)
            full[keep] = value
            value = full
        out[name] = value
    return out


def make_backend(name: str, *, onnx_path: Path | None, model: Model | None,
                 threads: int | None, spinning: bool = True, precision: str = "fp32",
                 packed: bool = False, yield_cores: bool = False) -> Backend:
    """A backend by name.

    Raises:
        BertrtError: unknown name, or what it needs is missing (an ONNX file, a model dir).
        BackendUnavailable: the machine cannot run it (serve-bench skips it).
    """
    if name not in BACKENDS:
        raise BertrtError(f"backend {name!r} is unknown; expected one of {', '.join(BACKENDS)}")
    if name in ONNX_BACKENDS:
        if onnx_path is None:
            raise BertrtError(f"backend {name}: no ONNX model to run")
        if name == "openvino":
            return OpenVinoBackend(onnx_path, threads=threads, precision=precision)
        cls = OrtCudaBackend if name == "ort-cuda" else OrtBackend
        return cls(onnx_path, threads=threads, spinning=spinning, yield_cores=yield_cores)
    if model is None:
        raise BertrtError("backend torch needs the model's weights: give a model dir as MODEL "
                          "(or --model-dir DIR beside an .onnx file)")
    return TorchBackend(model, threads=threads, packed=packed)
