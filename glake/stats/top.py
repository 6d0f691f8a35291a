"""``glake top``: a live view of every glake process of this user (or of the ones named).

On a terminal it redraws in place (rich Live); otherwise (a pipe, a file, a test) it prints one
plain frame per refresh. ``--iterations N`` stops after N frames.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence

from rich.console import Console, Group
from rich.text import Text

from glake.stats import discovery, tables
from glake.stats.client import StatsClient, StatsError


def sample(targets: Sequence[str], timeout: float) -> tuple:
    """GetStats of each target (every live process when none are named); returns (replies, problems)."""
    replies: List[Dict[str, Any]] = []
    problems: List[str] = []
    if targets:
        for t in targets:
            try:
                with StatsClient(t, timeout=timeout) as c:
                    replies.append(c.get_stats())
            except StatsError as e:
                problems.append(str(e))
    else:
        for e in discovery.discover(clean=False, timeout=timeout):
            if e.stats is not None:
                replies.append(e.stats)
            elif e.status == discovery.NOT_ANSWERING:
                problems.append(f"pid {e.pid}: {e.reason}")
    return replies, problems


def frame(replies: Sequence[Dict[str, Any]], problems: Sequence[str], previous: Dict[Any, Any], interval: float,
          iteration: int) -> Group:
    """One screen: the table and the problems under it."""
    now = datetime.now().strftime("%H:%M:%S")
    title = (f"glake top   {now}   {len(replies)} process{'es' if len(replies) != 1 else ''}   "
             f"every {interval:g} s   frame {iteration}")
    parts: List[Any] = [tables.top_table(tables.top_rows(replies, previous), title)]
    if not replies:
        parts.append(Text("no live glake process (start one with GLAKE_STATS=1, or glake.stats.serve())",
                          style="yellow"))
    for p in problems:
        parts.append(Text(p, style="red"))
    parts.append(Text("ALLOC/s, FREE/s: allocations and frees per second since the last frame; DRIVER: share of "
                      "wall time spent in VMM driver calls; FRAG: 1 - largest free block / free bytes", style="dim"))
    return Group(*parts)


def run_top(targets: Sequence[str], interval: float = 1.0, iterations: int = 0, timeout: float = 2.0,
            console: Optional[Console] = None) -> int:
    """Refresh every ``interval`` seconds, ``iterations`` times (0: until Ctrl-C)."""
    console = console or Console()
    previous: Dict[Any, Any] = {}
    live_mode = console.is_terminal
    i = 0
    try:
        if live_mode:
            from rich.live import Live

            with Live(console=console, auto_refresh=False, screen=False) as live:
                while not iterations or i < iterations:
                    i += 1
                    started = time.monotonic()
                    live.update(frame(*sample(targets, timeout), previous, interval, i), refresh=True)
                    if not iterations or i < iterations:
                        time.sleep(max(0.0, interval - (time.monotonic() - started)))
        else:
            while not iterations or i < iterations:
                i += 1
                started = time.monotonic()
                console.print(frame(*sample(targets, timeout), previous, interval, i))
                console.print()
                if not iterations or i < iterations:
                    time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["run_top", "sample", "frame"]
