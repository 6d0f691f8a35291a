"""rich tables of stats replies and memory maps (used by ``glake ps``, ``stats``, ``top``, ``map``)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from glake.stats import memmap
from glake.stats.units import fmt_bytes, fmt_count, fmt_figure, fmt_ns


def command_line(process: Mapping[str, Any], width: int = 60) -> str:
    cmd = " ".join(process.get("argv") or []) or "?"
    return cmd if len(cmd) <= width else cmd[: width - 1] + "…"


def allocator_totals(stats: Mapping[str, Any]) -> Dict[str, Any]:
    """Sums over a reply's allocator sections: bytes now and at peak, stitches, OOMs, devices."""
    t = {"allocated": 0, "allocated_peak": 0, "reserved": 0, "reserved_peak": 0, "stitched": 0, "stitches": 0,
         "ooms": 0, "devices": [], "pools": 0}
    for s in stats["sections"]:
        if s["name"] != "allocator" or s["error"]:
            continue
        c = s["counters"]
        t["pools"] += 1
        t["allocated"] += c.get("allocated_bytes.all.current", 0)
        t["allocated_peak"] += c.get("allocated_bytes.all.peak", 0)
        t["reserved"] += c.get("reserved_bytes.all.current", 0)
        t["reserved_peak"] += c.get("reserved_bytes.all.peak", 0)
        t["stitched"] += c.get("stitched_bytes.current", 0)
        t["stitches"] += c.get("num_stitches", 0)
        t["ooms"] += c.get("num_ooms", 0)
        if s["device"] not in t["devices"]:
            t["devices"].append(s["device"])
    return t


def ps_table(entries: Sequence[Any]) -> Table:
    """One row per stats socket: live processes with their totals, others with what is wrong."""
    table = Table(box=box.SIMPLE_HEAD, title="glake processes", title_justify="left")
    rows = []
    for e in entries:
        if e.stats is None:
            rows.append((str(e.pid), e.status, "", "", "", "", "", "", "", e.reason))
            continue
        t = allocator_totals(e.stats)
        p = e.stats["process"]
        rows.append((str(e.pid), e.status, p["backend"], ",".join(map(str, t["devices"])) or "-",
                     fmt_bytes(t["allocated"]), fmt_bytes(t["reserved"]), fmt_bytes(t["reserved_peak"]),
                     f"{fmt_bytes(t['stitched'])} ({t['stitches']})", str(t["ooms"]), command_line(p)))
    for i, (col, justify) in enumerate((("PID", "right"), ("STATUS", "left"), ("BACKEND", "left"),
                                        ("DEV", "left"), ("ALLOCATED", "right"), ("RESERVED", "right"),
                                        ("PEAK RESERVED", "right"), ("STITCHED", "right"), ("OOMS", "right"),
                                        ("COMMAND", "left"))):
        if col == "COMMAND":  # the only column that gives way on a narrow terminal
            table.add_column(col, justify=justify, min_width=12, ratio=1)
        else:
            table.add_column(col, justify=justify, no_wrap=True, min_width=max([len(col)] + [len(r[i]) for r in rows]))
    for r, e in zip(rows, entries):
        style = "green" if e.stats is not None else "yellow"
        table.add_row(r[0], Text(r[1], style=style), *r[2:9], Text(r[9], style="" if e.stats else "dim"))
    return table


def _section_title(s: Mapping[str, Any]) -> str:
    parts = [s["name"]]
    labels = dict(s["labels"])
    if "pool" in labels:
        parts.append(labels.pop("pool"))
    if s["device"] >= 0:
        parts.append(f"device {s['device']}")
    parts.extend(f"{k}={v}" for k, v in sorted(labels.items()))
    return " · ".join(parts)


# Figures shown first, in this order (torch's memory_summary order, then glake's); others follow by name.
FIRST = ("allocated_bytes.all", "allocated_bytes.small_pool", "allocated_bytes.large_pool", "active_bytes.all",
         "requested_bytes.all", "reserved_bytes.all", "reserved_bytes.small_pool", "reserved_bytes.large_pool",
         "free_bytes", "largest_free_bytes", "stitched_bytes", "lent_bytes", "held_bytes", "mapped_va_bytes",
         "stitched_va_bytes", "allocation.all", "segment.all", "allocation.all.allocated", "allocation.all.freed",
         "num_stitches", "num_stitch_reuses", "num_stitch_gc", "num_alloc_retries", "num_ooms", "limit_bytes",
         "chunks_live", "chunks_created", "chunks_released", "physical_bytes", "mapped_bytes", "reserved_va_bytes",
         "ranges_live")


def _order(stem: str) -> tuple:
    return (FIRST.index(stem), "") if stem in FIRST else (len(FIRST), stem)


def section_table(s: Mapping[str, Any]) -> Any:
    """A section's figures (``X.current`` / ``X.peak`` pairs share a row); driver calls
    (``calls.OP`` / ``time_ns.OP``) in a table of their own."""
    from rich.console import Group

    table = Table(box=box.SIMPLE_HEAD, title=_section_title(s), title_justify="left", title_style="bold")
    table.add_column("figure")
    table.add_column("current", justify="right")
    table.add_column("peak", justify="right")
    if s["error"]:
        table.add_row(Text("error", style="red"), Text(s["error"], style="red"), "")
        return table
    counters: Dict[str, Any] = dict(s["counters"])
    ops = sorted(k[len("calls."):] for k in counters if k.startswith("calls."))
    rows: Dict[str, List[Any]] = {}
    for key, value in counters.items():
        if key.startswith("calls.") or (key.startswith("time_ns.") and ops):
            continue
        if key.endswith(".current") or key.endswith(".peak"):
            stem, which = key.rsplit(".", 1)
            rows.setdefault(stem, [None, None])[0 if which == "current" else 1] = value
        else:
            rows[key] = [value, None]
    for stem in sorted(rows, key=_order):
        cur, peak = rows[stem]
        table.add_row(stem, fmt_figure(stem, cur) if cur is not None else "",
                      fmt_figure(stem, peak) if peak is not None else "")
    for key, value in sorted(s["values"].items()):
        table.add_row(key, f"{value:.3f}", "")
    if not ops:
        return table
    drv = Table(box=box.SIMPLE_HEAD, title=f"{_section_title(s)} · driver calls", title_justify="left",
                title_style="bold")
    for col in ("operation", "calls", "time", "mean"):
        drv.add_column(col, justify="left" if col == "operation" else "right")
    for op in ops:
        n, t = counters.get(f"calls.{op}", 0), counters.get(f"time_ns.{op}", 0)
        drv.add_row(op, fmt_count(n), fmt_ns(t), fmt_ns(t / n) if n else "")
    if "time_ns.total" in counters:
        drv.add_row(Text("total", style="bold"), fmt_count(sum(counters.get(f"calls.{op}", 0) for op in ops)),
                    fmt_ns(counters["time_ns.total"]), "")
    return Group(table, drv)


def map_table(pool: Mapping[str, Any], limit: int = 40) -> Table:
    """The segments of a pool with their blocks per state, and the pool's figures as the title."""
    m = memmap.summarize([pool])
    title = (f"{pool['name']} ({pool['backend']}, device {pool['device']}): fragmentation {m['fragmentation']:.2f}, "
             f"utilization {m['utilization']:.0%}, reserved {fmt_bytes(m['reserved'])}, allocated "
             f"{fmt_bytes(m['allocated'])}, free {fmt_bytes(m['free'])} (largest {fmt_bytes(m['largest_free'])})")
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for col in ("address", "kind", "size", "blocks", "allocated", "free", "lent", "pending/held"):
        table.add_column(col, justify="left" if col in ("address", "kind") else "right")
    for seg in pool["segments"][:limit]:
        by: Dict[str, int] = {}
        for b in seg["blocks"]:
            by[b["state"]] = by.get(b["state"], 0) + b["size"]
        kind = seg["kind"] + ("" if seg["kind"] != "stitched" else (" (active)" if seg["active"] else " (idle)"))
        table.add_row(f"0x{seg['address']:x}", kind, fmt_bytes(seg["size"]), fmt_count(len(seg["blocks"])),
                      fmt_bytes(by.get("allocated", 0)), fmt_bytes(by.get("free", 0)), fmt_bytes(by.get("lent", 0)),
                      fmt_bytes(by.get("pending", 0) + by.get("held", 0)))
    if len(pool["segments"]) > limit:
        table.caption = f"... and {len(pool['segments']) - limit} more (glake map --json has them all)"
    return table


def top_rows(samples: Sequence[Mapping[str, Any]], previous: Mapping[Any, Mapping[str, Any]]) -> List[List[Any]]:
    """Rows of ``glake top``: one per allocator of each process (or one per process without one).

    ``previous`` maps ``(pid, pool)`` and ``(pid, "vmm")`` to the last sample's counters and time,
    for rates; it is updated in place.
    """
    rows: List[List[Any]] = []
    for stats in samples:
        p = stats["process"]
        pid, now = p["pid"], stats["timestamp_unix_ns"]
        drv = ""
        vmm_total = sum(s["counters"].get("time_ns.total", 0) for s in stats["sections"] if s["name"] == "vmm")
        last = previous.get((pid, "vmm"))
        if last is not None and now > last["t"]:
            drv = f"{100.0 * (vmm_total - last['time']) / (now - last['t']):.1f}%"
        previous[(pid, "vmm")] = {"t": now, "time": vmm_total}  # type: ignore[index]
        allocs = [s for s in stats["sections"] if s["name"] == "allocator" and not s["error"]]
        if not allocs:
            rows.append([pid, "-", "", "", "", "", "", "", "", "", "", "", drv, command_line(p, 40)])
        for s in allocs:
            c, v = s["counters"], s["values"]
            key = (pid, s["labels"].get("pool", str(s["device"])))
            rate_a = rate_f = ""
            last = previous.get(key)
            if last is not None and now > last["t"]:
                dt = (now - last["t"]) / 1e9
                rate_a = f"{(c.get('allocation.all.allocated', 0) - last['a']) / dt:,.0f}"
                rate_f = f"{(c.get('allocation.all.freed', 0) - last['f']) / dt:,.0f}"
            previous[key] = {"t": now, "a": c.get("allocation.all.allocated", 0),  # type: ignore[index]
                             "f": c.get("allocation.all.freed", 0)}
            rows.append([pid, key[1], s["device"],
                         f"{fmt_bytes(c.get('allocated_bytes.all.current', 0))} / "
                         f"{fmt_bytes(c.get('allocated_bytes.all.peak', 0))}",
                         f"{fmt_bytes(c.get('reserved_bytes.all.current', 0))} / "
                         f"{fmt_bytes(c.get('reserved_bytes.all.peak', 0))}",
                         f"{fmt_bytes(c.get('stitched_bytes.current', 0))} ({c.get('num_stitches', 0)})",
                         fmt_bytes(c.get("mapped_va_bytes.current", 0)),
                         f"{v.get('fragmentation', 0.0):.2f}", f"{v.get('utilization', 0.0):.0%}",
                         rate_a, rate_f, str(c.get("num_ooms", 0)), drv, command_line(p, 40)])
    return rows


TOP_COLUMNS = ("PID", "POOL", "DEV", "ALLOCATED / PEAK", "RESERVED / PEAK", "STITCHED (#)", "MAPPED VA", "FRAG",
               "UTIL", "ALLOC/s", "FREE/s", "OOMS", "DRIVER", "COMMAND")


def top_table(rows: Sequence[Sequence[Any]], title: str) -> Table:
    """The ``glake top`` table: figures keep their width, the command line takes what is left."""
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", title_style="bold")
    cells = [[str(x) for x in r] for r in rows]
    for i, col in enumerate(TOP_COLUMNS):
        if col == "COMMAND":
            table.add_column(col, justify="left", no_wrap=True, overflow="ellipsis", min_width=12, ratio=1)
        else:
            width = max([len(col)] + [len(r[i]) for r in cells])
            table.add_column(col, justify="left" if col == "POOL" else "right", no_wrap=True, min_width=width)
    for r in cells:
        table.add_row(*r)
    return table


__all__ = ["allocator_totals", "ps_table", "section_table", "map_table", "top_rows", "top_table", "TOP_COLUMNS",
           "command_line"]
