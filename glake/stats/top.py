"""``glake top``: a live view of every glake process of this user (or of the ones named).

On a terminal it redraws in place (rich Live) and ``q`` quits; otherwise (a pipe, a file) it
prints one plain frame per refresh. ``--iterations N`` stops after N frames; without it, it runs
until ``q`` or Ctrl-C. A terminal too narrow for every column gets the most important ones, whole.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from datetime import datetime
from typing import Any, Dict, Iterator, List, Optional, Sequence

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
          iteration: int, width: Optional[int] = None, keys: bool = False) -> Group:
    """One screen: the table (fitted to ``width`` characters) and the problems under it."""
    now = datetime.now().strftime("%H:%M:%S")
    title = (f"glake top   {now}   {len(replies)} process{'es' if len(replies) != 1 else ''}   "
             f"every {interval:g} s   frame {iteration}{'   q quits' if keys else ''}")
    rows = tables.top_rows(replies, previous)
    parts: List[Any] = [tables.top_table(rows, title, width)]
    hidden = [c for c in tables.TOP_COLUMNS if c not in tables.top_columns(rows, width)]
    if hidden:
        parts.append(Text(f"not shown at this width: {', '.join(hidden)} (widen the terminal, or glake stats PID)",
                          style="yellow"))
    if not replies:
        parts.append(Text("no live glake process (start one with GLAKE_STATS=1, or glake.stats.serve())",
                          style="yellow"))
    for p in problems:
        parts.append(Text(p, style="red"))
    parts.append(Text("ALLOC/s, FREE/s: allocations and frees per second since the last frame; DRIVER: share of "
                      "wall time spent in VMM driver calls; FRAG: 1 - largest free block / free bytes; "
                      "-: no allocator; ?: not reported", style="dim"))
    return Group(*parts)


@contextlib.contextmanager
def key_reader(stream: Any) -> Iterator[Optional[int]]:
    """The terminal's fd in cbreak mode (keys arrive one by one, unechoed) while inside; None if not a terminal."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def wait_for_quit(fd: Optional[int], seconds: float) -> bool:
    """Sleep ``seconds``, or less if ``q`` is pressed on ``fd``; returns whether it was."""
    deadline = time.monotonic() + max(0.0, seconds)
    while True:
        left = deadline - time.monotonic()
        if fd is None:
            time.sleep(max(0.0, left))
            return False
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 64)
            if not data or b"q" in data.lower():  # q, Q, or the terminal went away
                return True


def run_top(targets: Sequence[str], interval: float = 1.0, iterations: Optional[int] = None, timeout: float = 2.0,
            console: Optional[Console] = None, keys: Any = None) -> int:
    """Refresh every ``interval`` seconds, ``iterations`` times (None: until ``q`` or Ctrl-C).

    ``keys`` is where ``q`` is read from on a terminal (default: stdin).

    Raises
    ------
    ValueError
        ``iterations`` below 1 or ``interval`` not positive.
    """
    if iterations is not None and iterations < 1:
        raise ValueError(f"--iterations must be at least 1, not {iterations} (leave it out to run until q or Ctrl-C)")
    if not interval > 0:
        raise ValueError(f"--interval must be positive, not {interval:g}")
    console = console or Console()
    previous: Dict[Any, Any] = {}
    live_mode = console.is_terminal
    i = 0

    def more() -> bool:
        return iterations is None or i < iterations

    try:
        if live_mode:
            from rich.live import Live

            with key_reader(keys if keys is not None else sys.stdin) as fd, \
                    Live(console=console, auto_refresh=False, screen=False) as live:
                while more():
                    i += 1
                    started = time.monotonic()
                    live.update(frame(*sample(targets, timeout), previous, interval, i, console.width, fd is not None),
                                refresh=True)
                    if more() and wait_for_quit(fd, interval - (time.monotonic() - started)):
                        break
        else:
            while more():
                i += 1
                started = time.monotonic()
                console.print(frame(*sample(targets, timeout), previous, interval, i, console.width))
                console.print()
                if more():
                    time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["run_top", "sample", "frame", "key_reader", "wait_for_quit"]
