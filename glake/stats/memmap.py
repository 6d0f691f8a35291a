"""The memory map as plain data: pools of segments, blocks and stitched ranges, and its figures.

A pool is a dict shaped like the ``Pool`` message of ``proto/glake_stats.proto``::

    {"name": "cuda:0", "device": 0, "backend": "cuda", "granularity": 2097152,
     "segments": [{"kind": "large", "address": ..., "size": ..., "active": True,
                   "blocks": [{"address", "size", "requested", "state", "stream", "lent_to"}]}]}

Block states: ``allocated``, ``free``, ``lent`` (a segment's block whose chunks a stitched range
uses; ``Allocator.snapshot`` calls it ``stitched``), ``held`` (a freed stitched range kept mapped
for reuse), ``pending`` (freed, waiting for other streams). The same code summarises a map built
in-process and one received over the wire, so the CLI, the picture and the stats agree.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping

STATES = ("allocated", "pending", "free", "lent", "held")
KINDS = ("small", "large", "stitched")
#: The one vocabulary of what a piece of memory is doing, for every tool (``glake map`` text, the PNG):
#: the states above, and ``detached`` for a stitched range whose chunks went back (its VA is kept).
SHOWN_STATES = STATES + ("detached",)
STATE_LABELS = {
    "allocated": "allocated",
    "pending": "pending (freed, awaiting other streams)",
    "free": "free (cached)",
    "lent": "lent (its chunks mapped into a stitched range)",
    "held": "held (a freed stitched range, kept mapped)",
    "detached": "detached (a stitched range whose chunks went back)",
}
_SNAPSHOT_STATE = {"stitched": "lent"}  # Allocator.snapshot's name for a lent segment block


def pool_from_snapshot(name: str, device: int, backend: str, granularity: int,
                       snapshot: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Build a pool from ``Allocator.snapshot()``: normalised states, address order, stitch links."""
    segments = []
    for seg in snapshot:
        kind = str(seg["kind"])
        blocks = []
        for b in seg["blocks"]:
            state = str(b["state"])
            blocks.append({"address": int(b["address"]), "size": int(b["size"]), "requested": int(b["requested"]),
                           "state": _SNAPSHOT_STATE.get(state, state) if kind != "stitched" else state,
                           "stream": int(b["stream"]), "lent_to": int(b.get("lent_to", 0) or 0)})
        blocks.sort(key=lambda b: b["address"])
        segments.append({"kind": kind, "address": int(seg["address"]), "size": int(seg["size"]),
                         "active": bool(seg["active"]), "blocks": blocks})
    segments.sort(key=lambda s: s["address"])
    pool = {"name": name, "device": int(device), "backend": backend, "granularity": int(granularity),
            "segments": segments}
    link_lent_blocks(pool)
    return pool


def shown_state(segment: Mapping[str, Any], block: Mapping[str, Any]) -> str:
    """The state a tool shows for ``block`` of ``segment``: its state, or ``detached`` for a free stitched range."""
    if segment["kind"] == "stitched" and block["state"] == "free":
        return "detached"
    return str(block["state"])


def live_stitches(pool: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """Stitched ranges that hold lent chunks now: allocated, pending or held (not detached)."""
    return [s for s in pool["segments"] if s["kind"] == "stitched" and s["blocks"]
            and s["blocks"][0]["state"] in ("allocated", "pending", "held")]


def link_lent_blocks(pool: Dict[str, Any]) -> int:
    """Fill ``lent_to`` of lent blocks where the owner is certain; returns how many were linked.

    ``Allocator.snapshot`` does not say which stitched range uses a lent block (a snapshot block
    with a ``lent_to`` key is taken as it is). When exactly one stitched range holds lent chunks,
    every lent block is its; with several the owner is left 0 (unknown) rather than guessed (sizes
    do not decide it: a stitch's members may cover more than its block). A server that knows (the
    C++ one can) fills it itself.
    """
    live = live_stitches(pool)
    if len(live) != 1:
        return 0
    owner = live[0]["address"]
    n = 0
    for seg in pool["segments"]:
        if seg["kind"] == "stitched":
            continue
        for b in seg["blocks"]:
            if b["state"] == "lent" and not b["lent_to"]:
                b["lent_to"] = owner
                n += 1
    return n


def summarize(pools: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Figures of one or several pools, from the map alone.

    Returns
    -------
    dict
        ``reserved`` (bytes of segments: physical memory, the allocator's ``reserved_bytes``),
        ``allocated`` (allocated blocks, stitched ranges included: the allocator's
        ``allocated_bytes``), ``pending`` (freed blocks waiting for other streams),
        ``free`` (free segment blocks), ``lent`` (segment blocks lent to stitched ranges), ``held``
        (freed stitched ranges kept for reuse), ``largest_free`` (largest free segment block),
        ``fragmentation`` (1 - largest_free / free: 0 when all free memory is one block, near 1
        when it is in many small pieces; 0 when nothing is free), ``utilization``
        (allocated / reserved), counts of ``segments``, ``stitched_ranges``, ``blocks``, ``chunks``.
    """
    out = {"reserved": 0, "allocated": 0, "pending": 0, "free": 0, "lent": 0, "held": 0, "largest_free": 0,
           "segments": 0, "stitched_ranges": 0, "blocks": 0, "chunks": 0}
    for pool in pools:
        g = int(pool.get("granularity") or 0)
        for seg in pool["segments"]:
            stitched = seg["kind"] == "stitched"
            if stitched:
                out["stitched_ranges"] += 1
            else:
                out["segments"] += 1
                out["reserved"] += seg["size"]
                if g:
                    out["chunks"] += -(-seg["size"] // g)
            for b in seg["blocks"]:
                out["blocks"] += 1
                state = b["state"]
                if state == "allocated":
                    out["allocated"] += b["size"]
                elif state == "pending":
                    out["pending"] += b["size"]
                elif stitched and state == "held":
                    out["held"] += b["size"]
                elif not stitched and state == "free":
                    out["free"] += b["size"]
                    out["largest_free"] = max(out["largest_free"], b["size"])
                elif not stitched and state == "lent":
                    out["lent"] += b["size"]
    out["fragmentation"] = 1.0 - out["largest_free"] / out["free"] if out["free"] else 0.0
    out["utilization"] = out["allocated"] / out["reserved"] if out["reserved"] else 0.0
    return out


__all__ = ["STATES", "KINDS", "SHOWN_STATES", "STATE_LABELS", "shown_state", "pool_from_snapshot", "live_stitches", "link_lent_blocks", "summarize"]
