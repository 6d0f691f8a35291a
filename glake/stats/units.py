"""Formatting of figures for people: bytes (:func:`glake.units.fmt_bytes`), durations, counts."""

from __future__ import annotations

from glake.units import fmt_bytes  # the one byte formatter


def fmt_ns(ns: float) -> str:
    """Nanoseconds -> ``"812 ns"``, ``"3.21 ms"``, ``"1.50 s"``."""
    ns = float(ns)
    if abs(ns) < 1_000:
        return f"{ns:.0f} ns"
    if abs(ns) < 1_000_000:
        return f"{ns / 1e3:.1f} µs"
    if abs(ns) < 1_000_000_000:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_count(n: float) -> str:
    """``1234567`` -> ``"1,234,567"``."""
    return f"{int(n):,}"


def fmt_figure(key: str, value: float) -> str:
    """A figure by its name: ``*bytes*`` as bytes, ``time_ns*`` as a duration, else a count or ratio."""
    if isinstance(value, float) and not float(value).is_integer():
        return f"{value:.3f}"
    if "bytes" in key:
        return fmt_bytes(value)
    if key.startswith("time_ns") or key.endswith("_ns"):
        return fmt_ns(value)
    return fmt_count(value)


__all__ = ["fmt_bytes", "fmt_ns", "fmt_count", "fmt_figure"]
