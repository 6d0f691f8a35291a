"""The one vocabulary of sizes and settings: byte counts in and out, configuration values as text.

Every glake setting that takes a size (``GLAKE_ALLOC_CONF``, ``GLAKE_MULTIPATH_CONF``, keyword
arguments of ``glake.Allocator``, ``glake.multipath.Engine``, ``glake.kvcache.KVCache``) is parsed by
the one C++ parser in ``glake._C`` (csrc/common/conf.h): ``1048576``, ``512MB``, ``2GiB``, ``1.5G``
(K, M, G, T are powers of 1024). Every size shown to people goes through :func:`fmt_bytes`.
"""

from __future__ import annotations

from typing import Any, Mapping, Dict, Union

from glake import _C
from glake.errors import InvalidArgumentError

KEYWORD = "keyword argument"  # the source named in errors about keyword arguments


def conf_text(value: Any) -> str:
    """A Python setting as configuration text: ``True`` -> ``"true"``, ``[1, 2]`` -> ``"1+2"``, ``"8GB"`` as is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "+".join(conf_text(v) for v in value)
    return str(value)


def conf_texts(conf: Mapping[str, Any]) -> Dict[str, str]:
    """:func:`conf_text` of every value of a mapping of keyword arguments."""
    return {str(k): conf_text(v) for k, v in conf.items()}


def parse_bytes(value: Union[int, str], key: str = "", source: str = KEYWORD) -> int:
    """A byte count from an int or a string such as ``"512MB"``; errors name ``key`` and ``source``.

    Raises
    ------
    InvalidArgumentError
        Not a non-negative integer nor a byte-count string.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)) and not hasattr(value, "__index__"):
        raise InvalidArgumentError(f"{key or 'value'}={value!r} ({source}): not a byte count "
                                   "(an int, or a string such as '512MB' or '2GiB')")
    if isinstance(value, str):
        return int(_C.conf_bytes(value, key, source))
    n = int(value)
    if n < 0:
        raise InvalidArgumentError(f"{key or 'value'}={n} ({source}): not a byte count (must be non-negative)")
    return n


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"``; ``0`` -> ``"0 B"`` (powers of 1024)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


__all__ = ["conf_text", "conf_texts", "parse_bytes", "fmt_bytes", "KEYWORD"]
