"""Reading an `.onnx` file for inspection and serving: op counts, fused ops, inputs/outputs,
opsets and the metadata bertrt's exporter writes.

This module only *reads* ONNX (`bertrt.lower.to_onnx` is the only code that writes it). Every
problem with the file — missing, empty, truncated, not a protobuf, failing the ONNX checker —
is a `BertrtError`: one line naming the file and what is wrong.

Example:
    >>> info = describe("model.onnx")
    >>> info.op_counts["com.microsoft::Attention"]
    6
    >>> print(format_info(info))
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertrt.errors import BertrtError
from bertrt.units import human

#: The name `op_counts` uses for ONNX's default domain ("" or "ai.onnx" in a file).
DEFAULT_DOMAIN = "ai.onnx"

#: Ops that stand for several core ops: every op outside the default domain (ONNX Runtime's
#: `com.microsoft` fused ops and the like) plus these core ops that are fusions themselves.
FUSED_CORE_OPS = frozenset({"LayerNormalization", "Attention", "Gelu", "FastGelu",
                            "RMSNormalization"})


@dataclass
class TensorSpec:
    """A graph input or output: name, element type, dims (ints, or names of dynamic axes)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass
class OnnxInfo:
    """What `describe` found in an `.onnx` file."""

    path: Path
    file_size: int
    ir_version: int
    producer: str
    opset_imports: dict[str, int]
    #: Nodes per `domain::op` (default domain spelled `ai.onnx`), subgraphs included.
    op_counts: Counter[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: `metadata_props` as written (strings).
    metadata: dict[str, str]
    num_initializers: int
    #: Elements in all initializers (the parameter count, tied weights counted once).
    param_count: int
    external_data: bool = False
    #: Metadata decoded where it is JSON (config, id2label, fusion counts, ...).
    decoded: dict[str, Any] = field(default_factory=dict)
    #: Rows of the table `input_ids` indexes, when the graph shows it.
    embedding_rows: int | None = None

    @property
    def num_nodes(self) -> int:
        return sum(self.op_counts.values())

    @property
    def fused_ops(self) -> dict[str, int]:
        """The fused ops among `op_counts` (see `is_fused`)."""
        return {k: v for k, v in sorted(self.op_counts.items()) if is_fused(k)}

    @property
    def config(self) -> dict[str, Any] | None:
        """The model config from the metadata, if there is one."""
        cfg = _find(self.decoded, ("config",))
        return cfg if isinstance(cfg, dict) else None

    @property
    def packed(self) -> bool:
        """A packed (padding-free) export: it takes `cu_seqlens`."""
        return any(spec.name == "cu_seqlens" for spec in self.inputs)

    @property
    def precision(self) -> str:
        """What bertrt's exporter wrote it to compute in: "int8", "fp16" or "fp32"."""
        return file_precision(self.metadata)

    def vocab_matches(self, tokenizer: Any) -> bool:
        """Whether `tokenizer`'s vocabulary is the one the file was exported with (True when
        the file records no checksum)."""
        expected = self.metadata.get("vocab_sha256")
        if not expected:
            return True
        from bertrt.lower.to_onnx import vocab_checksum

        vocab = tokenizer.vocab
        return vocab_checksum(sorted(vocab, key=vocab.__getitem__))["vocab_sha256"] == expected

    @property
    def vocab_size(self) -> int | None:
        """`vocab_size` from the metadata config, else the rows of the word-embedding table."""
        cfg = self.config
        if cfg and isinstance(cfg.get("vocab_size"), int):
            return int(cfg["vocab_size"])
        return self.embedding_rows


def file_precision(metadata: dict[str, str]) -> str:
    """The precision bertrt's exporter recorded in a file's metadata."""
    if metadata.get("int8") == "true":
        return "int8"
    return "fp16" if metadata.get("fp16") == "true" else "fp32"


def is_fused(key: str) -> bool:
    """Whether a `domain::op` key names a fused op (non-default domain, or a fused core op)."""
    domain, _, op = key.rpartition("::")
    return domain != DEFAULT_DOMAIN or op in FUSED_CORE_OPS


def _onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a core dependency
        raise BertrtError("the onnx package is not installed (pip install onnx)") from None
    return onnx


def read_model(path: str | os.PathLike[str], check: bool = True) -> Any:
    """Load an `.onnx` file's `ModelProto` (external data not loaded), checked.

    Args:
        path: The file.
        check: Run `onnx.checker.check_model` on it (catches truncation that still parses).

    Raises:
        BertrtError: the file is missing, empty, not an ONNX protobuf (e.g. truncated or
            corrupt), or fails the ONNX checker.
    """
    onnx = _onnx()
    path = Path(path)
    if path.is_dir():
        raise BertrtError(f"{path}: not a file (expected an .onnx model)")
    try:
        data = path.read_bytes()  # read once: parsed here, and checked from these bytes
    except FileNotFoundError:
        raise BertrtError(f"{path}: no such file") from None
    except OSError as exc:
        raise BertrtError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise BertrtError(f"{path}: empty file (expected an .onnx model)")
    try:
        model = onnx.load_model_from_string(data)  # external data stays unloaded
    except Exception as exc:  # protobuf raises DecodeError/RuntimeError; both mean corrupt
        raise BertrtError(f"{path}: not a readable ONNX model, truncated or corrupt "
                          f"({_first_line(exc)})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise BertrtError(f"{path}: not a readable ONNX model, truncated or corrupt "
                          "(no graph or an empty graph)")
    if check:
        external = any(t.data_location == onnx.TensorProto.EXTERNAL
                       for t in model.graph.initializer)
        try:
            # external tensors are found relative to the file, so that form needs the path
            # (the file then holds no weights: reading it again is cheap)
            onnx.checker.check_model(str(path) if external else data)
        except Exception as exc:
            raise BertrtError(f"{path}: fails the ONNX checker, truncated or corrupt "
                              f"({_first_line(exc)})") from None
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    name = type(exc).__name__
    line = line[:200] + ("..." if len(line) > 200 else "")
    return f"{name}: {line}" if line else name


def _walk_nodes(graph: Any) -> Iterator[Any]:
    """Every node of `graph`, the subgraphs of If/Loop/Scan included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _walk_nodes(attr.g)
            for sub in attr.graphs:
                yield from _walk_nodes(sub)


def op_key(node: Any) -> str:
    """`domain::op` of a node, the default domain spelled `ai.onnx`."""
    domain = node.domain or DEFAULT_DOMAIN
    return f"{domain}::{node.op_type}"


def count_ops(model: Any) -> Counter[str]:
    """Nodes per `domain::op` in a `ModelProto` (subgraphs and local functions' callers)."""
    return Counter(op_key(n) for n in _walk_nodes(model.graph))


def _spec(value_info: Any) -> TensorSpec:
    onnx = _onnx()
    t = value_info.type
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
        dims: tuple[int | str, ...] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tt.shape.dim
        ) if tt.HasField("shape") else ("...",)
        return TensorSpec(value_info.name, dtype, dims)
    return TensorSpec(value_info.name, t.WhichOneof("value") or "?", ())


def _decode(metadata: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, text in metadata.items():
        try:
            out[key] = json.loads(text)
        except (ValueError, TypeError):
            out[key] = text
    return out


def _find(decoded: dict[str, Any], words: tuple[str, ...]) -> Any:
    """The first metadata value whose key contains one of `words` (keys vary by writer)."""
    for word in words:
        if word in decoded:
            return decoded[word]
    for word in words:
        for key, value in decoded.items():
            if word in key.lower():
                return value
    return None


def _embedding_rows(model: Any) -> int | None:
    """Rows of the table that `input_ids` indexes (Gather or EmbedLayerNormalization)."""
    init = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        ins = list(node.input)
        if node.op_type == "Gather" and len(ins) == 2 and ins[0] in init and "input_ids" in ins[1]:
            return int(init[ins[0]].dims[0])
        if node.op_type == "EmbedLayerNormalization" and len(ins) > 2 and ins[2] in init:
            return int(init[ins[2]].dims[0])
    return None


def describe(path: str | os.PathLike[str], check: bool = True) -> OnnxInfo:
    """Read an `.onnx` file and summarise it; see `OnnxInfo`.

    Raises:
        BertrtError: the file is unreadable (see `read_model`).
    """
    path = Path(path)
    model = read_model(path, check=check)
    graph = model.graph
    onnx = _onnx()
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    initializer_names = {t.name for t in graph.initializer}
    metadata = {p.key: p.value for p in model.metadata_props}
    return OnnxInfo(
        path=path,
        file_size=path.stat().st_size,
        ir_version=int(model.ir_version),
        producer=" ".join(x for x in (model.producer_name, model.producer_version) if x),
        opset_imports={(o.domain or DEFAULT_DOMAIN): int(o.version) for o in model.opset_import},
        op_counts=count_ops(model),
        # inputs that are also initializers are (overridable) constants, not model inputs
        inputs=[_spec(v) for v in graph.input if v.name not in initializer_names],
        outputs=[_spec(v) for v in graph.output],
        metadata=metadata,
        num_initializers=len(graph.initializer),
        param_count=sum(math.prod(t.dims) for t in graph.initializer),
        external_data=external,
        decoded=_decode(metadata),
        embedding_rows=_embedding_rows(model),
    )


def _config_summary(cfg: dict[str, Any]) -> str:
    keys = (("num_hidden_layers", "layers"), ("hidden_size", "hidden"),
            ("num_attention_heads", "heads"), ("intermediate_size", "intermediate"),
            ("vocab_size", "vocab"), ("max_position_embeddings", "max_positions"),
            ("hidden_act", "act"))
    return " ".join(f"{short}={cfg[k]}" for k, short in keys if k in cfg)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Metadata keys bertrt's exporter writes, with other spellings read too (first found wins).
_META_KEYS: dict[str, tuple[str, ...]] = {
    "head": ("head",),
    "flavour": ("flavour", "flavor"),
    "fp16": ("fp16",),
    "opset": ("opset",),
    "bertrt": ("bertrt_version", "version"),
    "vocab": ("vocab_sha256", "vocab_checksum", "vocab_md5"),
    "vocab_size": ("vocab_size",),
    "id2label": ("id2label",),
    "fusions": ("fusions", "fusion_counts", "fused"),
}


def metadata_lines(info: OnnxInfo) -> list[tuple[str, str]]:
    """(label, text) rows for the metadata: config summary, head, flavour, vocab checksum,
    id2label, fusion counts, then any other key as written. Malformed values are shown raw."""
    rows: list[tuple[str, str]] = []
    used: set[str] = set()
    raw_config = info.metadata.get("config")
    if raw_config is not None:
        used.add("config")
        cfg = info.config
        rows.append(("config", _config_summary(cfg) if cfg else _short(raw_config)))
    found: dict[str, Any] = {}
    for label, keys in _META_KEYS.items():
        key = next((k for k in keys if k in info.decoded), None)
        if key is not None:
            used.add(key)
            found[label] = info.decoded[key]
    if "head" in found:
        rows.append(("head", _short(found["head"])))
    if "flavour" in found:
        extras = [f"opset {found['opset']}"] if "opset" in found else []
        if str(found.get("fp16", "")).lower() == "true" or found.get("fp16") is True:
            extras.append("fp16")
        rows.append(("flavour", _short(found["flavour"]) + (f" ({', '.join(extras)})"
                                                            if extras else "")))
    if "bertrt" in found:
        rows.append(("bertrt", _short(found["bertrt"])))
    if "vocab" in found:
        size = f" ({found['vocab_size']} tokens)" if "vocab_size" in found else ""
        rows.append(("vocab", f"sha256 {_short(found['vocab'])}{size}"))
    if "id2label" in found:
        rows.append(("id2label", _short(found["id2label"])))
    if "fusions" in found:
        fus = found["fusions"]
        text = (", ".join(f"{k} {v}" for k, v in fus.items()) if isinstance(fus, dict)
                else _short(fus))
        rows.append(("fusions", text))
    for key in info.metadata:
        if key not in used and key not in ("opset", "fp16", "vocab_size"):
            rows.append((key, _short(info.metadata[key])))
    return rows


def format_info(info: OnnxInfo) -> str:
    """The text `bertrt inspect model.onnx` prints."""
    lines = [f"{info.path}: ONNX model, {human(info.file_size, 'B')}"
             f"{' + external data' if info.external_data else ''}, "
             f"{info.param_count:,} parameters in {info.num_initializers} initializers, "
             f"{info.num_nodes} nodes"]
    lines.append(f"  ir_version {info.ir_version}"
                 + (f", producer {info.producer}" if info.producer else ""))
    opsets = sorted(info.opset_imports.items())
    lines.append("  opsets: " + ", ".join(f"{d} {v}" for d, v in opsets))

    lines.append("metadata:")
    lines.extend(f"  {label:<10} {text}" for label, text in metadata_lines(info))
    if not info.metadata:
        lines.append("  (none)")

    lines.append("inputs:")
    lines.extend(f"  {spec}" for spec in info.inputs)
    lines.append("outputs:")
    lines.extend(f"  {spec}" for spec in info.outputs)

    fused = info.fused_ops
    lines.append("fused ops: " + (", ".join(f"{k.rpartition('::')[2]} {v}"
                                            for k, v in fused.items()) if fused else "none"))
    lines.append("op counts (* = fused):")
    width = max(len(k) for k in info.op_counts)
    for key, n in sorted(info.op_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        mark = "*" if is_fused(key) else " "
        lines.append(f"  {mark} {key:<{width}} {n:>5}")
    lines.append(f"  total {info.num_nodes} nodes, {len(info.op_counts)} kinds")
    return "\n".join(lines)
