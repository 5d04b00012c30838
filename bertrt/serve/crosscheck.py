"""Do backends compute the same thing? The comparison serve-bench runs before it times.

`max_abs_diff` is bertrt's one output comparison (the benchmarks in `tools/` use it too): per
output, the largest |a - b| over real positions. `cross_check` applies the bounds that define
"correct" (docs: numbers that define correct) to the outputs of several backends on one batch:

- both sides float32: max abs difference at most `FP32_ABS` (1e-4);
- either side computes with fewer mantissa bits (fp16 weights, bf16, TF32 matrix products;
  see `Backend.reduced_precision`): max abs difference at most `REDUCED_REL` (1e-2) times the
  reference output's largest magnitude;
- either side runs int8 weight products (`Backend.precision`): at most `INT8_REL` (5e-2)
  times it (the int8 gate proper is on embeddings over real texts: tests/onnx/test_int8.py).

A result over its bound raises `BackendsDisagree`, one line naming each differing output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bertrt.errors import BertrtError

if TYPE_CHECKING:
    from bertrt.serve.backends import Backend

#: Max abs difference allowed between two float32 backends.
FP32_ABS = 1e-4
#: Max abs difference, relative to the reference's largest |value|, when either side computes
#: in reduced precision (fp16 or TF32).
REDUCED_REL = 1e-2
#: The same, when either side runs int8 weight products.
INT8_REL = 5e-2

Outputs = Mapping[str, np.ndarray]


class BackendsDisagree(BertrtError):
    """Backends' outputs differ beyond the bound; `check` is the cross-check that says so."""

    def __init__(self, check: dict[str, Any]) -> None:
        self.check = check
        super().__init__(format_disagreement(check))


def _compared(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """`x` as float64, restricted to real positions when it is per token."""
    x = np.asarray(x, dtype=np.float64)
    # per-token outputs are (B, S, ...); a (B, H) pooler output with H == S is not one
    return x[keep] if x.ndim >= 3 and x.shape[:2] == keep.shape else x


def max_abs_diff(a: Outputs, b: Outputs, attention_mask: np.ndarray) -> dict[str, float]:
    """Per output in both, the max |a - b| over real positions (padded ones are unspecified:
    outputs shaped (B, S, ...) are compared where `attention_mask` is 1); `inf` where the
    shapes differ.

    Args:
        a, b: Named outputs (numpy arrays) of two runs on the same batch.
        attention_mask: (B, S), 1 at real positions.
    """
    keep = np.asarray(attention_mask).astype(bool)
    diffs: dict[str, float] = {}
    for name in a:
        if name not in b:
            continue
        if np.shape(a[name]) != np.shape(b[name]):
            diffs[name] = float("inf")
            continue
        x, y = _compared(a[name], keep), _compared(b[name], keep)
        diffs[name] = float(np.max(np.abs(x - y))) if x.size else 0.0
    return diffs


def bound_for(reference: Backend, other: Backend) -> tuple[float, bool]:
    """(bound, relative) for comparing `other` with `reference`; see the module docstring."""
    if "int8" in (reference.precision, other.precision):
        return INT8_REL, True
    if reference.reduced_precision or other.reduced_precision:
        return REDUCED_REL, True
    return FP32_ABS, False


def cross_check(outputs: Mapping[str, Outputs], backends: Sequence[Backend],
                attention_mask: np.ndarray, shape: str) -> dict[str, Any]:
    """Compare every backend's outputs with the first's, on one batch.

    Args:
        outputs: Per backend name, its outputs on the batch.
        backends: The backends, the reference first.
        attention_mask: (B, S) of the batch.
        shape: The batch's shape label, for the report.

    Returns:
        `{"reference", "shape", "results": {name: {"max_abs_diff", "per_output", "bound",
        "relative", "failing"}}}`; `failing` lists the outputs over the bound (all of the
        reference's when the two have no output in common).
    """
    ref = backends[0]
    keep = np.asarray(attention_mask).astype(bool)
    results: dict[str, Any] = {}
    for other in backends[1:]:
        per = max_abs_diff(outputs[ref.label], outputs[other.label], attention_mask)
        bound, relative = bound_for(ref, other)
        failing = sorted(outputs[ref.label]) if not per else []
        for name, diff in per.items():
            scale = float(np.max(np.abs(_compared(outputs[ref.label][name], keep)),
                                 initial=0.0)) if relative else 1.0
            if not diff <= bound * scale:  # also catches nan
                failing.append(name)
        results[other.label] = {"max_abs_diff": max(per.values(), default=float("nan")),
                               "per_output": per, "bound": bound, "relative": relative,
                               "failing": failing}
    return {"reference": ref.label, "shape": shape, "results": results}


def disagreeing(check: dict[str, Any]) -> bool:
    """Whether any backend of a cross-check has an output over its bound."""
    return any(res["failing"] for res in check.get("results", {}).values())


def format_cross_check(check: dict[str, Any]) -> str:
    """The report's one line about the cross-check."""
    if not check.get("results"):
        return "cross-check: one backend, nothing to compare"
    parts = []
    for name, res in check["results"].items():
        per = ", ".join(f"{k} {v:.2e}" for k, v in res["per_output"].items())
        parts.append(f"{name} vs {check['reference']}: max abs diff {res['max_abs_diff']:.2e} "
                     f"({per})")
    return f"cross-check on the first batch ({check['shape']}): " + "; ".join(parts)


def format_disagreement(check: dict[str, Any]) -> str:
    """One line: which backends differ, on which outputs, by how much, against which bound."""
    parts = []
    for name, res in check["results"].items():
        if not res["failing"]:
            continue
        bound = (f"{res['bound']:g} x max |{check['reference']}|" if res["relative"]
                 else f"{res['bound']:g}")
        if not res["per_output"]:
            parts.append(f"{name} vs {check['reference']}: no output in common (reference "
                         f"has {', '.join(res['failing'])})")
            continue
        diffs = ", ".join(f"{k} {res['per_output'][k]:.2e}" for k in res["failing"])
        parts.append(f"{name} vs {check['reference']}: {diffs} (max abs diff; bound {bound})")
    return (f"backends disagree on the first batch ({check['shape']}), nothing timed: "
            + "; ".join(parts))
