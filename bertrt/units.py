"""Human-readable quantities: the one formatter for byte sizes and counts (FLOPs, parameters).

A neutral module (numbers in, text out; no torch, no onnx) so that the IR's inspection and the
ONNX reader share it without importing each other.
"""

from __future__ import annotations

_PREFIXES = ("", "K", "M", "G", "T")


def human(n: float, unit: str = "") -> str:
    """`n` with a decimal (SI) prefix: `512B`, `1.50KB`, `3.20GFLOP`-style (no space).

    Below 1000 the value is printed whole; above, with two decimals and the largest prefix
    that keeps it under 1000 (`T` at most).

    Args:
        n: The quantity (bytes, FLOPs, ...).
        unit: Appended after the prefix, e.g. `"B"`.
    """
    for prefix in _PREFIXES:
        if abs(n) < 1000 or prefix == _PREFIXES[-1]:
            return f"{n:.0f}{unit}" if prefix == "" else f"{n:.2f}{prefix}{unit}"
        n /= 1000.0
    raise AssertionError("unreachable: the last prefix always returns")  # pragma: no cover
