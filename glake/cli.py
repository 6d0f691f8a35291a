"""The `glake` command line.

    glake run [--conf KEY:VALUE,...] -- python train.py [args]   run a program with glake as its allocator
    glake ps [--json]                                            glake processes of this user publishing stats
    glake stats PID|ADDR [--json] [--prometheus]                 the stats of one process
    glake top [PID|ADDR ...] [--interval S] [--iterations N]     a live view of glake processes
    glake map PID|ADDR [--png FILE] [--json]                     the memory map of one process (a picture)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_autoinstall")


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("glake run: nothing to run (usage: glake run -- python train.py [args])", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["GLAKE_AUTO_INSTALL"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HOOK_DIR, env.get("PYTHONPATH", "")) if p)
    if args.conf:
        env["GLAKE_ALLOC_CONF"] = args.conf
    try:
        os.execvpe(command[0], command, env)  # the program's exit code and signals are its own
    except FileNotFoundError:
        print(f"glake run: command not found: {command[0]}", file=sys.stderr)
        return 127


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="glake", description="GPU memory management for PyTorch and LLM serving")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a program with glake installed as torch's and CuPy's allocator",
                         description="Runs COMMAND with glake installed into torch (and CuPy) as soon as they are "
                                     "imported, before any CUDA allocation. No code changes needed.")
    run.add_argument("--conf", help="allocator configuration, e.g. 'stitch:true,limit_bytes:70GB' "
                                    "(sets GLAKE_ALLOC_CONF for the program)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    run.set_defaults(func=_run)
    from glake.stats.cli import add_parsers  # imports nothing heavy: grpc, rich etc. load when a command runs

    add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
