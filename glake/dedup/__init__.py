"""Cross-process dedup: processes of one user share identical read-only chunks (weights) through IPC.

>>> import glake.dedup
>>> shared = glake.dedup.share(model.requires_grad_(False))   # weights packed, whole chunks shared
>>> glake.dedup.stats()["saved_bytes"]                         # memory this process did not need

Each 2 MiB chunk is hashed where it lives (torch kernels on the GPU for cuda; BLAKE2b on the host),
looked up in the per-user broker (``glake dedupd``, started on demand), **compared byte by byte** with
the chunk found, and only then mapped, read-only, at the same address in place of this process's own
copy, which is freed. A chunk no process has published yet becomes the canonical one (and is read-only
from then on). Only chunks a buffer covers whole are shared. The broker keeps one fd per canonical chunk;
each process also holds its own handle, so shared memory stays valid whichever process (or the broker)
dies first, and is freed once no process maps it.

Writing to a shared chunk faults: on the host backend the writing process gets SIGSEGV; on a GPU the
kernel that writes hits an illegal-address error, which ends that process's CUDA context. No other
process's bytes change.

Dedup works on memory it owns: :class:`Arena` (and :func:`share`, which packs tensors into arenas).
Memory of glake's caching allocator is not shared in place (its chunks are the allocator's to reuse).
"""

from glake.dedup.arena import Arena, arena_of, stats
from glake.dedup.tensors import SharedTensors, share


def share_buffer(ptr: int, nbytes: int) -> int:
    """Shares the whole chunks of ``[ptr, ptr + nbytes)``, which must lie in an open :class:`Arena`.

    Returns the bytes of that arena now shared. See :meth:`Arena.share`.
    """
    a = arena_of(int(ptr), int(nbytes))
    return a.share(int(ptr) - a.ptr, int(nbytes))


def broker_stats() -> dict:
    """The broker's figures (chunks, bytes, holds, clients, pid); starts it if none runs."""
    from glake.dedup.client import client

    return client().stats()


__all__ = ["Arena", "SharedTensors", "share", "share_buffer", "stats", "broker_stats"]
