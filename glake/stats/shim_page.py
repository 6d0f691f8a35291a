"""The stats pages of processes running the libcuda shim (``glake run --shim``; csrc/shim/stats_page.h).

A shimmed process may have no Python, so it cannot serve gRPC: it writes ``<runtime dir>/<pid>.shim``,
a small file mapped shared and rewritten by one publisher thread under a seqlock. This module reads
it into the same shape as a GetStats reply (``{"process": ..., "sections": [...]}``), so ``glake ps``
and ``glake stats PID`` show a shimmed process like any other. Pages of processes that are gone are
stale (removed by ``glake ps``, like stale sockets). :func:`control` writes a request into the page's
control block (csrc/shim/control.h) for ``glake suspend|resume PID``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import struct
import time
from typing import Any, Dict, List, Optional, Tuple

from glake.stats import paths

PAGE_RE = re.compile(r"^(\d+)\.shim$")
MAGIC = b"GLKSHIM1"
MODES = {0: "not started", 1: "active", 2: "pass-through"}
# PageHeader up to its strings: magic, 12 32-bit fields (mode last), then device_mask, seq, start, updated,
# publishes (csrc/shim/stats_page.h; static_asserts there pin these offsets).
_HEAD = struct.Struct("<8sIIiIIIIIIIIIQQQQQ")
_SEQ = 14             # index of seq in _HEAD
ROW_COUNTERS = 64     # kMaxAllocCounters: one device's row of allocator values
_STRINGS = ((256, "real_driver"), (256, "reason"), (32, "glake_version"), (1024, "argv"))


class PageError(RuntimeError):
    """A page that cannot be read (not a glake page, or never stable while read)."""


def page_path(pid: int) -> str:
    """The stats page of process ``pid``."""
    return os.path.join(paths.runtime_dir(), f"{int(pid)}.shim")


def list_pages() -> List[Tuple[int, str]]:
    """``(pid, path)`` of every ``<pid>.shim`` in the runtime directory, by pid."""
    d = paths.runtime_dir()
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), os.path.join(d, n)) for n in names if (m := PAGE_RE.match(n)))


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _names(raw: bytes, offset: int, count: int, width: int) -> List[str]:
    return [_cstr(raw[offset + i * width: offset + (i + 1) * width]) for i in range(count)]


def _stable_copy(path: str, tries: int = 200) -> bytes:
    """The page's bytes, copied while its sequence number was even and unchanged (the seqlock)."""
    with open(path, "rb") as f:
        for _ in range(tries):
            f.seek(0)
            raw = f.read()
            if len(raw) < _HEAD.size or raw[:8] != MAGIC:
                raise PageError(f"{path} is not a glake shim stats page")
            seq = _HEAD.unpack_from(raw)[_SEQ]
            f.seek(0)
            again = _HEAD.unpack_from(f.read(_HEAD.size))[_SEQ]
            if seq % 2 == 0 and seq == again:
                return raw
            time.sleep(0.001)
    raise PageError(f"{path} was being rewritten on every read ({tries} tries)")


def read_page(path: str) -> Dict[str, Any]:
    """The page as a GetStats-shaped dict: ``process`` and the sections ``shim`` and ``allocator`` (one per device)."""
    raw = _stable_copy(path)
    (_, version, _size, pid, max_devices, name_bytes, n_shim, n_alloc, shim_names_off, alloc_names_off,
     shim_values_off, alloc_values_off, mode, device_mask, _seq, start_ns, updated_ns, publishes) = _HEAD.unpack_from(raw)
    if version != 1:
        raise PageError(f"{path}: page version {version}, this glake reads version 1")
    off = _HEAD.size
    text: Dict[str, str] = {}
    for width, key in _STRINGS:
        chunk = raw[off: off + width]
        text[key] = "\0".join(p.decode(errors="replace") for p in chunk.rstrip(b"\0").split(b"\0")) \
            if key == "argv" else _cstr(chunk)
        off += width
    shim_names = _names(raw, shim_names_off, n_shim, name_bytes)
    alloc_names = _names(raw, alloc_names_off, n_alloc, name_bytes)
    shim_values = struct.unpack_from(f"<{n_shim}q", raw, shim_values_off)
    labels = {"backend": "cuda", "pool": "", "server": "shim"}
    shim_section = {"name": "shim", "device": -1, "labels": {"mode": MODES.get(mode, str(mode))},
                    "counters": {n[len("shim."):]: v for n, v in zip(shim_names, shim_values)},
                    "values": {}, "error": ""}
    shim_section["counters"]["publishes"] = publishes
    sections = [shim_section]
    for d in range(max_devices):
        if not device_mask >> d & 1:
            continue
        vals = struct.unpack_from(f"<{n_alloc}q", raw, alloc_values_off + d * ROW_COUNTERS * 8)
        sections.append({"name": "allocator", "device": d, "labels": dict(labels, pool=f"cuda:{d}"),
                         "counters": dict(zip(alloc_names, vals)), "values": {}, "error": ""})
    process = {"pid": pid, "argv": [a for a in text["argv"].split("\0") if a], "glake_version": text["glake_version"],
               "backend": "cuda", "server": "shim", "start_time_unix_ns": start_ns,
               "listen_addresses": [path], "real_driver": text["real_driver"], "shim_mode": MODES.get(mode, str(mode)),
               "shim_reason": text["reason"], "updated_unix_ns": updated_ns}
    return {"process": process, "sections": sections}


def stale_reason(pid: int, path: str) -> Optional[str]:
    """Why the page of ``pid`` is stale (its process is gone or the pid was reused), or None."""
    from glake.stats.discovery import stale_reason as socket_stale

    return socket_stale(pid, path)


def read_pid(pid: int) -> Optional[Dict[str, Any]]:
    """The stats of shimmed process ``pid`` from its page, or None when it has no live page."""
    path = page_path(pid)
    if not os.path.exists(path) or stale_reason(pid, path) is not None:
        return None
    return read_page(path)


# ControlBlock (csrc/shim/control.h): request_seq, op, device | done_seq, status, reserved, device_mask,
# host_bytes, message[256]
CONTROL_OFFSET = 3072
_REQUEST = struct.Struct("<Qii")
_ANSWER = struct.Struct("<QiiQq256s")
_OPS = {"suspend": 1, "resume": 2}
OK, FAILED, OUT_OF_MEMORY = 0, 1, 2


class ControlError(RuntimeError):
    """A suspend or resume the shimmed process refused or failed: ``out_of_memory`` when the device
    could not give the memory back yet (the process stays suspended; ask again later)."""

    def __init__(self, message: str, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


def control(pid: int, op: str, device: Optional[int] = None, timeout: float = 600.0) -> Dict[str, Any]:
    """Has shimmed process ``pid`` suspend or resume (``op``) its glake memory on ``device`` (None:
    every device): ``{"devices": [...], "host_bytes": n}``, as the gRPC Suspend/Resume answer.

    The page is this user's (0600 in a 0700 folder): opening it is the permission check. The flock
    keeps two requests from interleaving; the publisher thread answers within ~50 ms plus the copy.
    """
    path = page_path(pid)
    if not os.path.exists(path) or stale_reason(pid, path) is not None:
        raise ControlError(f"pid {pid} has no live shim stats page ({path})")
    with open(path, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with mmap.mmap(f.fileno(), 4096) as m:
            seq = _REQUEST.unpack_from(m, CONTROL_OFFSET)[0] + 1
            m[CONTROL_OFFSET + 8:CONTROL_OFFSET + 16] = struct.pack("<ii", _OPS[op], -1 if device is None else int(device))
            m[CONTROL_OFFSET:CONTROL_OFFSET + 8] = struct.pack("<Q", seq)  # last: the shim acts on it
            deadline = time.monotonic() + timeout
            while True:
                done, status, _, mask, host_bytes, msg = _ANSWER.unpack_from(m, CONTROL_OFFSET + 16)
                if done == seq:
                    break
                if time.monotonic() > deadline:
                    raise ControlError(f"pid {pid} did not answer {op} within {timeout:g} s (--timeout)")
                if stale_reason(pid, path) is not None:
                    raise ControlError(f"pid {pid} exited before it answered {op}")
                time.sleep(0.01)
    if status != OK:
        raise ControlError(f"{op} in pid {pid}: {_cstr(msg)}", out_of_memory=status == OUT_OF_MEMORY)
    return {"devices": [d for d in range(64) if mask >> d & 1], "host_bytes": host_bytes}


__all__ = ["ControlError", "PageError", "control", "page_path", "list_pages", "read_page", "read_pid", "stale_reason"]
