"""rich tables of stats replies and memory maps (used by ``glake ps``, ``stats``, ``top``, ``map``)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from glake.stats import memmap
from glake.stats.units import fmt_bytes, fmt_count, fmt_figure, fmt_ns


def command_line(process: Mapping[str, Any], width: int = 60) -> str:
    cmd = " ".join(process.get("argv") or []) or "?"
    return cmd if len(cmd) <= width else cmd[: width - 1] + "…"


UNKNOWN = "?"  # a figure the process did not report: never shown as 0
NONE = "-"     # nothing to report (a process with no allocator has no allocated bytes to show)


def figure(counters: Mapping[str, Any], key: str, fmt=fmt_bytes) -> str:
    """``counters[key]`` formatted, or :data:`UNKNOWN` when the process did not report it."""
    return fmt(counters[key]) if key in counters else UNKNOWN


def allocator_totals(stats: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """Sums over a reply's allocator sections (bytes now and at peak, stitches, OOMs, devices), or None
    when the process publishes no allocator. A figure missing from any section makes its total None."""
    keys = {"allocated": "allocated_bytes.all.current", "allocated_peak": "allocated_bytes.all.peak",
            "reserved": "reserved_bytes.all.current", "reserved_peak": "reserved_bytes.all.peak",
            "stitched": "stitched_bytes.current", "stitches": "num_stitches", "ooms": "num_ooms"}
    t: Dict[str, Any] = {k: 0 for k in keys}
    t.update(devices=[], pools=0, failed=0)
    for s in stats["sections"]:
        if s["name"] != "allocator":
            continue
        if s["error"]:
            t["failed"] += 1
            continue
        c = s["counters"]
        t["pools"] += 1
        for name, key in keys.items():
            t[name] = None if t[name] is None or key not in c else t[name] + c[key]
        if s["device"] not in t["devices"]:
            t["devices"].append(s["device"])
    if not t["pools"] and not t["failed"]:
        return None
    if t["failed"]:  # a section that failed: its figures are unknown, so are the sums
        t.update({k: None for k in keys})
    return t


def _total(t: Optional[Mapping[str, Any]], key: str, fmt=fmt_bytes) -> str:
    if t is None:
        return NONE
    return UNKNOWN if t[key] is None else fmt(t[key])


def ps_table(entries: Sequence[Any]) -> Table:
    """One row per stats socket: live processes with their totals, others with what is wrong.

    A process that publishes no allocator shows ``-`` (nothing to count), a figure it did not report ``?``.
    """
    table = Table(box=box.SIMPLE_HEAD, title="glake processes", title_justify="left")
    rows = []
    for e in entries:
        if e.stats is None:
            rows.append((str(e.pid), e.status, "", "", "", "", "", "", "", e.reason))
            continue
        t = allocator_totals(e.stats)
        p = e.stats["process"]
        stitched = NONE if t is None else f"{_total(t, 'stitched')} ({_total(t, 'stitches', str)})"
        rows.append((str(e.pid), e.status, p["backend"], ",".join(map(str, t["devices"])) if t else NONE,
                     _total(t, "allocated"), _total(t, "reserved"), _total(t, "reserved_peak"), stitched,
                     _total(t, "ooms", str), command_line(p)))
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
    if any(e.stats is not None and allocator_totals(e.stats) is None for e in entries):
        table.caption = ("-: the process publishes no allocator (no glake.Allocator alive, glake.torch / glake.cupy "
                         "not installed)")
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
    """The segments of a pool with their bytes per state (:data:`memmap.STATE_LABELS`), the pool's figures as
    the title. A stitched range's kind says its state (``stitched · held``, ``stitched · detached``, ...)."""
    m = memmap.summarize([pool])
    title = (f"{pool['name']} ({pool['backend']}, device {pool['device']}): fragmentation {m['fragmentation']:.2f}, "
             f"utilization {m['utilization']:.0%}, reserved {fmt_bytes(m['reserved'])}, allocated "
             f"{fmt_bytes(m['allocated'])}, free {fmt_bytes(m['free'])} (largest {fmt_bytes(m['largest_free'])})")
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for col in ("address", "kind", "size", "blocks") + memmap.STATES:
        table.add_column(col, justify="left" if col in ("address", "kind") else "right")
    for seg in pool["segments"][:limit]:
        by: Dict[str, int] = {}
        for b in seg["blocks"]:
            by[b["state"]] = by.get(b["state"], 0) + b["size"]
        kind = seg["kind"]
        if kind == "stitched" and seg["blocks"]:
            kind += " · " + memmap.shown_state(seg, seg["blocks"][0])
        table.add_row(f"0x{seg['address']:x}", kind, fmt_bytes(seg["size"]), fmt_count(len(seg["blocks"])),
                      *(fmt_bytes(by[st]) if by.get(st) else "" for st in memmap.STATES))
    captions = []
    if len(pool["segments"]) > limit:
        captions.append(f"... and {len(pool['segments']) - limit} more (glake map --json has them all)")
    captions.append("; ".join(memmap.STATE_LABELS[s] for s in memmap.SHOWN_STATES))
    table.caption = "\n".join(captions)
    return table


def top_rows(samples: Sequence[Mapping[str, Any]], previous: Mapping[Any, Mapping[str, Any]]) -> List[List[Any]]:
    """Rows of ``glake top`` (cells in :data:`TOP_COLUMNS` order; DEDUP: the bytes glake.dedup saved the
    process): one per allocator of each process, or
    one per process without one (``-`` where it has nothing to count, ``?`` where a figure is not reported).

    ``previous`` maps ``(pid, pool)`` and ``(pid, "vmm")`` to the last sample's counters and time,
    for rates; it is updated in place.
    """
    rows: List[List[Any]] = []
    for stats in samples:
        p = stats["process"]
        pid, now = p["pid"], stats["timestamp_unix_ns"]
        drv = ""
        vmm = [s for s in stats["sections"] if s["name"] == "vmm" and not s["error"]]
        if vmm and all("time_ns.total" in s["counters"] for s in vmm):
            vmm_total = sum(s["counters"]["time_ns.total"] for s in vmm)
            last = previous.get((pid, "vmm"))
            if last is not None and now > last["t"]:
                drv = f"{100.0 * (vmm_total - last['time']) / (now - last['t']):.1f}%"
            previous[(pid, "vmm")] = {"t": now, "time": vmm_total}  # type: ignore[index]
        else:
            drv = UNKNOWN
        dd = [s for s in stats["sections"] if s["name"] == "dedup" and not s["error"]]
        saved = figure(dd[0]["counters"], "saved_bytes") if dd else NONE  # weights shared with other processes
        allocs = [s for s in stats["sections"] if s["name"] == "allocator"]
        imported = sum(s["counters"].get("shared_imported_bytes", 0) for s in allocs if not s["error"])
        if not dd and imported:  # a shim process's allocations shared by glake_shim_dedup_share
            saved = fmt_bytes(imported)
        if not allocs:
            rows.append([pid, NONE, NONE, NONE, NONE, NONE, NONE, NONE, NONE, NONE, NONE, NONE, saved, drv,
                         command_line(p, 40)])
        for s in allocs:
            c, v = s["counters"], s["values"]
            key = (pid, s["labels"].get("pool", str(s["device"])))
            if s["error"]:
                rows.append([pid, key[1], s["device"]] + [UNKNOWN] * 9 + [saved, drv, command_line(p, 40)])
                continue
            rate_a = rate_f = ""
            last = previous.get(key)
            counted = "allocation.all.allocated" in c and "allocation.all.freed" in c
            if not counted:
                rate_a = rate_f = UNKNOWN
            elif last is not None and now > last["t"]:
                dt = (now - last["t"]) / 1e9
                rate_a = f"{(c['allocation.all.allocated'] - last['a']) / dt:,.0f}"
                rate_f = f"{(c['allocation.all.freed'] - last['f']) / dt:,.0f}"
            if counted:
                previous[key] = {"t": now, "a": c["allocation.all.allocated"],  # type: ignore[index]
                                 "f": c["allocation.all.freed"]}
            rows.append([pid, key[1], s["device"],
                         f"{figure(c, 'allocated_bytes.all.current')} / {figure(c, 'allocated_bytes.all.peak')}",
                         f"{figure(c, 'reserved_bytes.all.current')} / {figure(c, 'reserved_bytes.all.peak')}",
                         f"{figure(c, 'stitched_bytes.current')} ({figure(c, 'num_stitches', str)})",
                         figure(c, "mapped_va_bytes.current"),
                         figure(v, "fragmentation", lambda x: f"{x:.2f}"),
                         figure(v, "utilization", lambda x: f"{x:.0%}"),
                         rate_a, rate_f, figure(c, "num_ooms", str), saved, drv, command_line(p, 40)])
    return rows


TOP_COLUMNS = ("PID", "POOL", "DEV", "ALLOCATED / PEAK", "RESERVED / PEAK", "STITCHED (#)", "MAPPED VA", "FRAG",
               "UTIL", "ALLOC/s", "FREE/s", "OOMS", "DEDUP", "DRIVER", "COMMAND")
#: Which columns stay when the terminal is narrow, most important first (COMMAND takes what is left).
TOP_PRIORITY = ("PID", "ALLOCATED / PEAK", "RESERVED / PEAK", "FRAG", "POOL", "STITCHED (#)", "ALLOC/s", "DRIVER",
                "OOMS", "DEDUP", "UTIL", "FREE/s", "MAPPED VA", "DEV")
_COMMAND_MIN = 12


def _top_width(widths: Sequence[int]) -> int:
    """Characters a SIMPLE_HEAD table of columns this wide takes (one blank each side of every cell)."""
    return sum(w + 2 for w in widths)


def top_columns(rows: Sequence[Sequence[Any]], width: Optional[int]) -> List[str]:
    """The columns that fit ``width`` characters without cutting a figure, in :data:`TOP_COLUMNS` order."""
    cells = [[str(x) for x in r] for r in rows]
    need = {col: max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(TOP_COLUMNS)}
    if width is None:
        return list(TOP_COLUMNS)
    kept: List[str] = []
    for col in TOP_PRIORITY:
        if not kept or _top_width([need[c] for c in kept + [col]] + [_COMMAND_MIN]) <= width:
            kept.append(col)
    shown = [c for c in TOP_COLUMNS if c in kept]
    if _top_width([need[c] for c in shown] + [_COMMAND_MIN]) <= width:
        shown.append("COMMAND")
    return shown


def top_table(rows: Sequence[Sequence[Any]], title: str, width: Optional[int] = None) -> Table:
    """The ``glake top`` table: figures are never cut; on a terminal too narrow for every column the least
    important ones (:data:`TOP_PRIORITY`) are left out (:func:`top_columns` says which)."""
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", title_style="bold")
    cells = [[str(x) for x in r] for r in rows]
    shown = top_columns(rows, width)
    index = [TOP_COLUMNS.index(c) for c in shown]
    for col, i in zip(shown, index):
        if col == "COMMAND":
            table.add_column(col, justify="left", no_wrap=True, overflow="ellipsis", min_width=_COMMAND_MIN, ratio=1)
        else:
            w = max([len(col)] + [len(r[i]) for r in cells])
            table.add_column(col, justify="left" if col == "POOL" else "right", no_wrap=True, min_width=w,
                             max_width=w)
    for r in cells:
        table.add_row(*(r[i] for i in index))
    return table


__all__ = ["allocator_totals", "ps_table", "section_table", "map_table", "top_rows", "top_table", "top_columns",
           "TOP_COLUMNS", "TOP_PRIORITY", "UNKNOWN", "NONE", "figure",
           "command_line"]
