"""Live stats of glake processes: a gRPC service per process, the ``glake`` CLI, Prometheus metrics.

>>> import glake.stats
>>> glake.stats.serve()                                  # or GLAKE_STATS=1 before `import glake`
>>> glake.stats.register_source("requests", server.figures)  # publish your own figures

Every ``glake.Allocator``, ``KVCache`` and multipath engine publishes itself while it lives;
``register_allocator(a, "weights")`` only renames one.

Then, from any shell of the same user: ``glake ps``, ``glake stats PID``, ``glake top``,
``glake map PID --png map.png``. The service is defined in ``proto/glake_stats.proto``.

Importing this package imports neither grpc nor protobuf: a layer can register its figures at
import, and nothing is paid until :func:`serve` is called.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from glake.stats.paths import runtime_dir, socket_path
from glake.stats.sources import register_allocator, register_section, register_source, unregister


def serve(address: Optional[str] = None, *, unix: bool = True, allow_remote: Optional[bool] = None) -> Any:
    """Start this process's stats server (idempotent); returns it (``.addresses``, ``.stop()``).

    See :func:`glake.stats.server.serve` for the arguments.
    """
    from glake.stats import server

    return server.serve(address, unix=unix, allow_remote=allow_remote)


def stop() -> None:
    """Stop this process's stats server, if it runs."""
    import sys

    server = sys.modules.get("glake.stats.server")
    if server is not None:
        server.stop()


def serve_from_env() -> None:
    """Start the server in the background when ``GLAKE_STATS=1`` (called by ``import glake``)."""
    import os

    if os.environ.get("GLAKE_STATS") == "1":
        from glake.stats import server

        server.serve_from_env()


def collect(sections: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """This process's stats sections as dicts, without any server (what GetStats would answer)."""
    from glake.stats import collector

    return collector.collect_sections(sections)


def memory_map(pool: str = "") -> List[Dict[str, Any]]:
    """This process's memory map (pools) as dicts, without any server."""
    from glake.stats import collector

    return collector.collect_pools(pool)


__all__ = ["serve", "stop", "serve_from_env", "register_source", "register_allocator", "register_section", "unregister", "collect",
           "memory_map", "runtime_dir", "socket_path"]
