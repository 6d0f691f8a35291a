"""The `glake` command line.

    glake run [--conf KEY:VALUE,...] -- python train.py [args]   run a program with glake as its allocator
    glake run --shim [--conf ...] -- ./cuda_program [args]       the same for any CUDA program (libcuda shim)
    glake ps [--json]                                            glake processes of this user publishing stats
    glake stats PID|ADDR [--json] [--prometheus]                 the stats of one process
    glake top [PID|ADDR ...] [--interval S] [--iterations N]     a live view of glake processes
    glake map PID|ADDR [--png FILE] [--json]                     the memory map of one process (a picture)
    glake serve [--model DIR] [--host H] [--port P] [--api-key K]   an OpenAI-compatible server (glake.serve)
    glake chat [--model DIR]                                     chat with a model in the terminal
    glake dedupd [--status | --stop] [--socket PATH]             the per-user dedup broker (glake.dedup)
    glake --version                                              version, backends built, backend in use
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_autoinstall")
CONF_ENV = "GLAKE_ALLOC_CONF"


def version_text() -> str:
    """``glake 0.1.0 (...)``: where it is, which backends this build has and which one is in use here."""
    import glake
    from glake import _C

    built = "host, cuda" if _C.cuda_backend_built() else "host (built without cuda.h)"
    reason = _C.cuda_unavailable_reason() if _C.cuda_backend_built() else ""
    try:
        active = glake.backend_name()
    except glake.GlakeError as e:  # GLAKE_BACKEND=cuda where it cannot work
        active = f"none ({e})"
    if active == "host" and reason:
        active += f" (cuda unusable here: {reason})"
    return (f"glake {glake.__version__} from {os.path.dirname(glake.__file__)} (Python "
            f"{sys.version.split()[0]})\nbackends built: {built}\nbackend in use: {active}")


def check_conf(text: str, source: str) -> Optional[str]:
    """The error in an allocator configuration text, or None when it is valid."""
    from glake import InvalidArgumentError, _C

    try:
        _C.alloc_conf_check(text, source)
    except InvalidArgumentError as e:
        return str(e)
    return None


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("glake run: nothing to run (usage: glake run -- python train.py [args])", file=sys.stderr)
        return 2
    env = dict(os.environ)
    conf, source = (args.conf, "glake run --conf") if args.conf is not None else (env.get(CONF_ENV, ""), CONF_ENV)
    problem = check_conf(conf, source)
    if problem:
        print(f"glake run: {problem}; the program was not started", file=sys.stderr)
        return 2
    if args.conf is not None:
        env[CONF_ENV] = args.conf
    if args.shim:  # every cuMemAlloc of the program goes to glake; torch/CuPy are not hooked on top
        from glake.errors import GlakeError
        from glake.shim import ShimError, shim_env

        try:
            env = shim_env(env)
            if env.get("GLAKE_DEDUP") == "1":  # the shim cannot start the broker (no Python there): start it now
                from glake.dedup.client import BrokerClient
                from glake.dedup.wire import SOCKET_ENV, socket_path

                BrokerClient(env.get(SOCKET_ENV) or socket_path()).stats()
        except (ShimError, GlakeError, OSError) as e:
            print(f"glake run --shim: {e}; the program was not started", file=sys.stderr)
            return 2
    else:
        env["GLAKE_AUTO_INSTALL"] = "1"
        env["GLAKE_RUN_PYTHON"] = sys.executable  # sitecustomize names it if the program's Python lacks glake
        env["PYTHONPATH"] = os.pathsep.join(p for p in (HOOK_DIR, env.get("PYTHONPATH", "")) if p)
    try:
        os.execvpe(command[0], command, env)  # the program's exit code and signals are its own
    except FileNotFoundError:
        print(f"glake run: command not found: {command[0]}", file=sys.stderr)
        return 127
    except PermissionError as e:
        print(f"glake run: cannot run {command[0]}: {e.strerror}", file=sys.stderr)
        return 126


def _dedupd(args: argparse.Namespace) -> int:
    from glake.dedup import broker, wire
    from glake.dedup.client import BrokerClient
    from glake.errors import GlakeError

    if not (args.status or args.stop):
        return broker.main((["--socket", args.socket] if args.socket else []) + ["--idle-exit", str(args.idle_exit)])
    path = args.socket or wire.socket_path()
    try:
        broker_client = BrokerClient(path, autostart=False)
        reply = broker_client.shutdown() if args.stop else broker_client.stats()
    except GlakeError as e:
        print(f"glake dedupd: {e}", file=sys.stderr)
        return 1
    if args.stop:
        print(f"glake dedupd: stopped the broker on {path}")
    else:
        print(f"glake dedupd: pid {reply['pid']} on {path}: {reply['chunks']} chunk(s), {reply['bytes']} B shared, "
              f"{reply['holds']} hold(s) by {reply['clients'] - 1} other client(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``glake`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="glake", description="GPU memory management for PyTorch and LLM serving: "
                                     "run a program under glake's allocator, and watch glake processes.")
    parser.add_argument("--version", action="store_true", help="print the version, the backends built and the "
                        "backend in use, and exit")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    run = sub.add_parser("run", help="run a program with glake installed as torch's and CuPy's allocator",
                         description="Runs COMMAND with glake installed into torch (and CuPy) as soon as they are "
                                     "imported, before any CUDA allocation. No code changes needed. The "
                                     "configuration is checked first, and a Python that cannot import glake stops "
                                     "before the program starts.")
    run.add_argument("--conf", help="allocator configuration, e.g. 'stitch:true,limit_bytes:70GB' "
                                    "(sets GLAKE_ALLOC_CONF for the program)")
    run.add_argument("--shim", action="store_true", help="preload glake's libcuda shim instead: every cuMemAlloc "
                     "of the program (any language, CUDA runtime included) goes to glake's stitched allocator; "
                     "stats through glake ps / glake stats PID (docs/shim.md)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    run.set_defaults(func=_run)
    dd = sub.add_parser("dedupd", help="run the per-user dedup broker (processes start it on demand)",
                        description="The broker through which this user's processes share identical read-only "
                                    "chunks (glake.dedup). It starts on demand; run it yourself to watch its log, "
                                    "or ask a running one for its figures or to stop.")
    dd.add_argument("--socket", help="socket path (default: $GLAKE_DEDUP_SOCKET, else dedup-v2.sock in the per-user "
                                     "runtime folder)")
    dd.add_argument("--idle-exit", type=float, default=300.0,
                    help="exit after this many seconds with no client and no chunk (0: never)")
    dd.add_argument("--status", action="store_true", help="print a running broker's figures")
    dd.add_argument("--stop", action="store_true", help="stop a running broker (processes keep what they mapped)")
    dd.set_defaults(func=_dedupd)
    from glake.stats.cli import add_parsers  # imports nothing heavy: grpc, rich etc. load when a command runs

    add_parsers(sub)
    from glake.serve.api.cli import add_parsers as add_serve_parsers  # fastapi, torch etc. load when run

    add_serve_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.cmd is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
