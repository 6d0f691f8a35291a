"""Plain data (the collector's dicts) to protobuf messages and back.

The dict shapes are those of the messages in ``proto/glake_stats.proto`` with enums as lower-case
names (``"allocated"``, ``"stitched"``), so code above the wire (CLI, picture, Prometheus) works
on one representation whether the figures came from this process or from another.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping

from glake.stats import glake_stats_pb2 as pb

_STATE_TO_PB = {"allocated": pb.BLOCK_STATE_ALLOCATED, "free": pb.BLOCK_STATE_FREE, "lent": pb.BLOCK_STATE_LENT,
                "held": pb.BLOCK_STATE_HELD, "pending": pb.BLOCK_STATE_PENDING}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_KIND_TO_PB = {"small": pb.SEGMENT_KIND_SMALL, "large": pb.SEGMENT_KIND_LARGE, "stitched": pb.SEGMENT_KIND_STITCHED}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


def process_to_pb(info: Mapping[str, Any]) -> "pb.ProcessInfo":
    return pb.ProcessInfo(pid=info["pid"], argv=info["argv"], glake_version=info["glake_version"],
                          backend=info["backend"], server=info["server"],
                          start_time_unix_ns=info["start_time_unix_ns"], listen_addresses=info["listen_addresses"])


def process_from_pb(m: "pb.ProcessInfo") -> Dict[str, Any]:
    return {"pid": m.pid, "argv": list(m.argv), "glake_version": m.glake_version, "backend": m.backend,
            "server": m.server, "start_time_unix_ns": m.start_time_unix_ns,
            "listen_addresses": list(m.listen_addresses)}


def section_to_pb(s: Mapping[str, Any]) -> "pb.Section":
    return pb.Section(name=s["name"], device=s["device"], labels=s["labels"], counters=s["counters"],
                      values=s["values"], error=s["error"])


def section_from_pb(m: "pb.Section") -> Dict[str, Any]:
    return {"name": m.name, "device": m.device, "labels": dict(m.labels), "counters": dict(m.counters),
            "values": dict(m.values), "error": m.error}


def stats_reply(info: Mapping[str, Any], sections: Iterable[Mapping[str, Any]], timestamp_ns: int,
                sequence: int = 0) -> "pb.StatsReply":
    return pb.StatsReply(process=process_to_pb(info), timestamp_unix_ns=timestamp_ns, sequence=sequence,
                         sections=[section_to_pb(s) for s in sections])


def stats_from_pb(m: "pb.StatsReply") -> Dict[str, Any]:
    """``{"process": {...}, "timestamp_unix_ns": int, "sequence": int, "sections": [...]}``."""
    return {"process": process_from_pb(m.process), "timestamp_unix_ns": m.timestamp_unix_ns,
            "sequence": m.sequence, "sections": [section_from_pb(s) for s in m.sections]}


def pool_to_pb(p: Mapping[str, Any]) -> "pb.Pool":
    segments = []
    for s in p["segments"]:
        blocks = [pb.Block(address=b["address"], size=b["size"], requested=b["requested"],
                           state=_STATE_TO_PB.get(b["state"], pb.BLOCK_STATE_UNSPECIFIED), stream=b["stream"],
                           lent_to=b["lent_to"]) for b in s["blocks"]]
        segments.append(pb.Segment(kind=_KIND_TO_PB.get(s["kind"], pb.SEGMENT_KIND_UNSPECIFIED), address=s["address"],
                                   size=s["size"], active=s["active"], blocks=blocks))
    return pb.Pool(name=p["name"], device=p["device"], backend=p["backend"], granularity=p["granularity"],
                   segments=segments)


def pool_from_pb(m: "pb.Pool") -> Dict[str, Any]:
    segments = []
    for s in m.segments:
        blocks = [{"address": b.address, "size": b.size, "requested": b.requested,
                   "state": _STATE_FROM_PB.get(b.state, "unknown"), "stream": b.stream, "lent_to": b.lent_to}
                  for b in s.blocks]
        segments.append({"kind": _KIND_FROM_PB.get(s.kind, "unknown"), "address": s.address, "size": s.size,
                         "active": s.active, "blocks": blocks})
    return {"name": m.name, "device": m.device, "backend": m.backend, "granularity": m.granularity,
            "segments": segments}


def memory_map(info: Mapping[str, Any], pools: Iterable[Mapping[str, Any]], timestamp_ns: int) -> "pb.MemoryMap":
    return pb.MemoryMap(process=process_to_pb(info), timestamp_unix_ns=timestamp_ns,
                        pools=[pool_to_pb(p) for p in pools])


def memory_map_from_pb(m: "pb.MemoryMap") -> Dict[str, Any]:
    """``{"process": {...}, "timestamp_unix_ns": int, "pools": [...]}``."""
    return {"process": process_from_pb(m.process), "timestamp_unix_ns": m.timestamp_unix_ns,
            "pools": [pool_from_pb(p) for p in m.pools]}


__all__ = ["process_to_pb", "process_from_pb", "section_to_pb", "section_from_pb", "stats_reply", "stats_from_pb",
           "pool_to_pb", "pool_from_pb", "memory_map", "memory_map_from_pb"]
