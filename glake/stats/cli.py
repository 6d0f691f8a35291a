"""The stats commands of ``glake``: ``ps``, ``stats``, ``top``, ``map``.

Building the parsers imports nothing heavy; each command imports grpc, rich and matplotlib only
when it runs (``glake run`` stays light and works without the stats extra installed).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List, Optional

MISSING_DEPS = "glake {cmd}: the stats commands need the 'stats' extra: pip install 'glake[stats]' ({err})"


PIPE_WIDTH = 220  # piped output is not squeezed to a terminal's width (like ps(1))


def _console(file=None):
    from rich.console import Console

    out = file or sys.stdout
    width = None if out.isatty() else PIPE_WIDTH  # a terminal: its own width
    return Console(file=out, width=width, highlight=False, soft_wrap=False)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def cmd_ps(args: argparse.Namespace) -> int:
    from glake.stats import discovery, tables

    entries = discovery.discover(clean=not args.no_clean, timeout=args.timeout)
    if args.json:
        _print_json([{"pid": e.pid, "socket": e.socket, "status": e.status, "reason": e.reason,
                      "process": e.stats["process"] if e.stats else None,
                      "totals": tables.allocator_totals(e.stats) if e.stats else None} for e in entries])
        return 0
    console = _console()
    if not entries:
        from glake.stats import paths

        console.print(f"no glake process publishes stats (none in {paths.runtime_dir()}); start one with "
                      "GLAKE_STATS=1 or glake.stats.serve()")
        return 0
    console.print(tables.ps_table(entries))
    for e in entries:
        if e.status == discovery.STALE_REMOVED:
            console.print(f"removed stale socket {e.socket}: {e.reason}")
        elif e.status == discovery.STALE:
            console.print(f"stale socket {e.socket}: {e.reason}", style="yellow")
    return 0


def _shim_stats(target: str) -> tuple:
    """``(page stats or None, whether the pid also serves gRPC)`` for a pid target."""
    import os

    from glake.stats import paths, shim_page

    if not target.isdigit():
        return None, True
    return shim_page.read_pid(int(target)), os.path.exists(paths.socket_path(int(target)))


def cmd_stats(args: argparse.Namespace) -> int:
    from glake.stats import tables
    from glake.stats.client import StatsClient

    page, has_socket = _shim_stats(args.target)
    if page is not None and not has_socket:  # a shimmed process: its shared-memory page
        if args.prometheus:
            raise ValueError(f"pid {args.target} runs the libcuda shim without Python: no Prometheus exposition "
                             "(use --json)")
        stats = dict(page, sections=[s for s in page["sections"] if not args.section or s["name"] in args.section])
    else:
        with StatsClient(args.target, timeout=args.timeout) as c:
            if args.prometheus:
                from glake.stats import prometheus

                sys.stdout.write(prometheus.exposition(targets=[args.target], timeout=args.timeout).decode())
                return 0
            stats = c.get_stats(args.section or ())
        if page is not None and (not args.section or "shim" in args.section):
            stats["sections"].extend(s for s in page["sections"] if s["name"] == "shim")
    if args.json:
        _print_json(stats)
        return 0
    console = _console()
    p = stats["process"]
    console.print(f"[bold]pid {p['pid']}[/bold]  {tables.command_line(p, 100)}  (glake {p['glake_version']}, "
                  f"backend {p['backend']}, {p['server']} server, {', '.join(p['listen_addresses'])})")
    for s in stats["sections"]:
        console.print(tables.section_table(s))
    return 0


def cmd_suspend_resume(args: argparse.Namespace) -> int:
    from glake.stats.client import StatsClient
    from glake.units import fmt_bytes

    page, has_socket = _shim_stats(args.target)
    if page is not None and not has_socket:  # a shimmed process without Python: its page's control block
        from glake.stats import shim_page

        try:
            reply = shim_page.control(int(args.target), args.cmd, args.device, timeout=args.timeout)
        except shim_page.ControlError as e:
            print(f"glake {args.cmd}: {e}" + (" (still suspended: free device memory and retry)"
                                               if e.out_of_memory else ""), file=sys.stderr)
            return 1
    else:
        with StatsClient(args.target, timeout=args.timeout) as c:
            reply = (c.suspend if args.cmd == "suspend" else c.resume)(args.device, timeout=args.timeout)
    done = ", ".join(str(d) for d in reply["devices"]) or "none (nothing to do)"
    verb = "suspended" if args.cmd == "suspend" else "resumed"
    print(f"{args.target}: {verb} device(s) {done}; {fmt_bytes(reply['host_bytes'])} of live data in host memory")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from glake.stats.top import run_top

    return run_top(args.targets, interval=args.interval, iterations=args.iterations, timeout=args.timeout,
                   console=_console())


def cmd_map(args: argparse.Namespace) -> int:
    from glake.stats import memmap, tables
    from glake.stats.client import StatsClient

    if not (16 <= args.width <= 20000) or (args.height is not None and not 16 <= args.height <= 20000):
        raise ValueError("--width and --height must be within 16..20000 pixels")
    if args.png and not args.png.lower().endswith(".png"):
        raise ValueError(f"--png writes a PNG picture: name the file *.png, not {args.png!r}")
    with StatsClient(args.target, timeout=args.timeout) as c:
        mm = c.memory_map(args.pool or "")
    if args.json:
        _print_json(mm)
    if args.png:
        from glake.stats.render import render_png

        w, h = render_png(args.png, mm["pools"], mm["process"], width=args.width, height=args.height,
                          scale=args.scale)
        m = memmap.summarize(mm["pools"])
        out = sys.stderr if args.json else sys.stdout
        print(f"wrote {args.png} ({w}x{h}): {m['segments']} segments, {m['stitched_ranges']} stitched ranges, "
              f"fragmentation {m['fragmentation']:.2f}, utilization {m['utilization']:.0%}", file=out)
    if not args.json and not args.png:
        console = _console()
        if not mm["pools"]:
            console.print(f"pid {mm['process']['pid']} publishes no allocator: it has no live glake.Allocator, and "
                          "glake.torch / glake.cupy have not allocated in it (its other figures: glake stats PID)")
        for pool in mm["pools"]:
            console.print(tables.map_table(pool))
    return 0


def _guarded(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            from glake.stats.client import StatsError
        except ImportError as e:  # grpc / protobuf missing
            print(MISSING_DEPS.format(cmd=args.cmd, err=e), file=sys.stderr)
            return 2
        try:
            return fn(args)
        except ImportError as e:  # rich / matplotlib / prometheus-client missing
            print(MISSING_DEPS.format(cmd=args.cmd, err=e), file=sys.stderr)
            return 2
        except StatsError as e:
            print(f"glake {args.cmd}: {e}", file=sys.stderr)
            return 1
        except (OSError, ValueError) as e:
            print(f"glake {args.cmd}: {e}", file=sys.stderr)
            return 1
    return run


def add_parsers(sub: Any) -> None:
    """Add ``ps``, ``stats``, ``top``, ``suspend``, ``resume`` and ``map`` to the ``glake`` command's subparsers."""
    target_help = "a pid, a socket path, unix:PATH or host:port"

    ps = sub.add_parser("ps", help="list the glake processes of this user that publish stats",
                        description="Lists every glake process of this user that publishes stats (its socket in "
                                    "the runtime directory), with its memory figures. Sockets of processes that are "
                                    "gone are removed, and said so.")
    ps.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ps.add_argument("--no-clean", action="store_true", help="report stale sockets but do not remove them")
    ps.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each process (default 2)")
    ps.set_defaults(func=_guarded(cmd_ps))

    st = sub.add_parser("stats", help="the stats of one glake process", description="Prints every section of the "
                        "stats of a glake process: allocators (torch's key names plus glake's), the VMM core's driver "
                        "counters, and any registered source (KV cache, multipath, ...).")
    st.add_argument("target", help=target_help)
    st.add_argument("--json", action="store_true", help="print the reply as JSON")
    st.add_argument("--prometheus", action="store_true", help="print the Prometheus text exposition")
    st.add_argument("--section", action="append", help="only this section (repeatable)")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    st.set_defaults(func=_guarded(cmd_stats))

    top = sub.add_parser("top", help="a live view of glake processes", description="Refreshes a table of every "
                         "live glake process (or of the targets named): memory now and at peak, stitching, "
                         "fragmentation, allocations per second, time in driver calls.")
    top.add_argument("targets", nargs="*", help=f"processes to watch ({target_help}); default: all")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--iterations", "-n", type=int, default=None, metavar="N",
                     help="stop after N refreshes, N >= 1 (default: run until q or Ctrl-C)")
    top.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each process (default 2)")
    top.set_defaults(func=_guarded(cmd_top))

    for name, what in (("suspend", "give a glake process's device memory back (glake.suspend() in it)"),
                       ("resume", "give a suspended glake process its device memory again (glake.resume() in it)")):
        sr = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ": its addresses stay "
                            "valid, its live data waits in host memory. Through the process's unix socket (it must "
                            "publish stats: GLAKE_STATS=1), or, for a program under `glake run --shim` without "
                            "Python, through its stats page. Its program must not touch the GPU while suspended.")
        sr.add_argument("target", help="a pid, a socket path or unix:PATH")
        sr.add_argument("--device", type=int, default=None, help="only this device (default: every device)")
        sr.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
        sr.set_defaults(func=_guarded(cmd_suspend_resume))

    mp = sub.add_parser("map", help="the memory map of a glake process (a table, JSON or a PNG picture)",
                        description="Fetches the segments, blocks and stitched ranges of a process's allocators. "
                                    "--png draws them: one band per segment or stitched range, blocks coloured by "
                                    "state, stitched ranges hatched and linked to the blocks they map, and the "
                                    "fragmentation in the title.")
    mp.add_argument("target", help=target_help)
    mp.add_argument("--png", metavar="FILE", help="write a picture of the map")
    mp.add_argument("--json", action="store_true", help="print the map as JSON")
    mp.add_argument("--pool", help="only this pool (e.g. cuda:0)")
    mp.add_argument("--width", type=int, default=1600, help="picture width in pixels (default 1600)")
    mp.add_argument("--height", type=int, default=None, help="picture height in pixels (default: from the bands)")
    mp.add_argument("--scale", choices=("auto", "bytes", "fit"), default="auto",
                    help="bytes: one scale for all bands; fit: each band spans the width; auto (default): fit when "
                         "band sizes differ over 16x")
    mp.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    mp.set_defaults(func=_guarded(cmd_map))


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m glake.stats.cli ...``: the same commands without ``run``."""
    parser = argparse.ArgumentParser(prog="glake")
    add_parsers(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
