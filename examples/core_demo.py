"""glake core demo: reserve, map, share, and print the core's counters.

Runs on the cuda backend when a GPU is usable, else on the host backend:

    python examples/core_demo.py [--backend host|cuda]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import textwrap

import glake
from glake import core

CHILD = textwrap.dedent(
    """
    import socket, sys
    from glake import core
    sock = socket.socket(fileno=int(sys.argv[1]))
    (chunk,) = core.recv_chunks(sock, backend=sys.argv[2])
    with core.VirtualRange(chunk.size, backend=sys.argv[2]) as r:
        r.map(0, chunk)
        core.write(r.ptr + 64, b"hello from process 2", backend=sys.argv[2])
    sock.sendall(b"done")
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description="reserve, map, share and print glake's counters")
    ap.add_argument("--backend", default=None, help="cuda or host (default: auto-detect)")
    args = ap.parse_args()
    backend = glake.backend_name(args.backend)
    g = core.granularity(backend)
    free, total = core.mem_info(backend)
    print(f"glake {glake.__version__}: backend={backend}, granularity={g >> 20} MiB, "
          f"device memory {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")

    pool = core.ChunkPool(limit_bytes=64 * g, backend=backend)
    chunks = pool.acquire_many(4)
    with core.VirtualRange(8 * g, backend=backend) as r:
        print(f"reserved {r.size >> 20} MiB of addresses at {r.ptr:#x}")
        r.map_many(0, chunks)
        print(f"mapped 4 chunks ({r.mapped_bytes >> 20} MiB) back to back")
        r.map(4 * g, chunks[0])  # the same physical chunk, a second address
        core.write(r.ptr, b"one chunk, two addresses", backend=backend)
        print(f"wrote at offset 0, read at offset {4 * g >> 20} MiB: {core.read(r.ptr + 4 * g, 24, backend=backend)!r}")

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(b.fileno()), backend], pass_fds=[b.fileno()])
            core.send_chunks(a, [chunks[1]])
            a.recv(4)
            child.wait(timeout=120)
        print(f"sent chunk #{chunks[1].id} to pid {child.pid} over a unix socket; it wrote: "
              f"{core.read(r.ptr + g + 64, 20, backend=backend)!r}")

        s = core.stats(backend)
        print("\ncore counters:")
        for key in ("chunks_live", "chunks_created", "physical_bytes.current", "reserved_va_bytes.current",
                    "mapped_bytes.current", "calls.map", "calls.set_access", "calls.export"):
            print(f"  {key:28s} {s[key]:>14,}")
        print(f"  {'time in driver calls (us)':28s} {s['time_ns.total'] / 1e3:>14,.1f}")
        print(f"  pool: {pool.stats()}")
    del chunks
    print(f"\nafter free: mapped={core.stats(backend)['mapped_bytes.current']} bytes, "
          f"pool cached={pool.stats()['cached_chunks']} chunks; trim released {pool.trim() >> 20} MiB")


if __name__ == "__main__":
    main()
