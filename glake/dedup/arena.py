"""Arena: memory whose whole chunks dedup may swap for identical chunks of other processes."""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

from glake import core
from glake.dedup import content, wire
from glake.dedup.client import client
from glake.errors import GlakeError, InvalidArgumentError

PRIVATE, CANONICAL, IMPORTED = "private", "canonical", "imported"

_arenas: "weakref.WeakSet[Arena]" = weakref.WeakSet()
_arenas_lock = threading.Lock()
_totals: Dict[str, Any] = {"hash_bytes": 0, "hash_ns": 0, "compare_bytes": 0, "compare_ns": 0, "mismatches": 0,
                           "broker_errors": 0, "last_broker_error": ""}


def _torch():
    import torch

    return torch


def _device_key(backend: str, device: int) -> str:
    """Which physical device a chunk lives on, the same in every process (CUDA_VISIBLE_DEVICES may
    number GPUs differently): the GPU's UUID on cuda."""
    if backend != "cuda":
        return "host"
    uuid = getattr(_torch().cuda.get_device_properties(device), "uuid", None)
    return f"cuda-{uuid}" if uuid is not None else f"cuda:{device}"


class Arena:
    """``nbytes`` (rounded up to whole chunks) of zeroed private memory at one address range, read-write.

    :meth:`share` offers its whole chunks to the other processes of this user: a chunk whose bytes
    another process (or this one) already published is replaced, at the same address, by that chunk
    mapped read-only, and this arena's own chunk is freed; a chunk no one has published yet becomes the
    canonical one and is made read-only here too. Bytes are compared before any chunk is shared. After
    sharing, a write to a shared chunk faults (host backend: SIGSEGV; cuda: an illegal-address error
    that ends the CUDA context), so share only what nobody writes again.

    Parameters
    ----------
    nbytes : int
        Bytes wanted (> 0).
    device : int
        Device ordinal.
    backend : str, optional
        ``"cuda"`` or ``"host"`` (default: glake's backend resolution).
    """

    def __init__(self, nbytes: int, device: int = 0, backend: Optional[str] = None) -> None:
        if int(nbytes) <= 0:
            raise InvalidArgumentError(f"Arena: nbytes must be > 0, got {nbytes}")
        self.backend = core.backend_name(backend)
        self.device = int(device)
        self.chunk = core.granularity(self.backend, self.device)
        n = -(-int(nbytes) // self.chunk)
        self.nbytes = int(nbytes)
        self.range = core.VirtualRange(n * self.chunk, self.device, self.backend)
        self._chunks: List[Any] = [core.PhysChunk(self.chunk, self.device, self.backend) for _ in range(n)]
        self.range.map_many(0, self._chunks)
        if self.backend == "cuda":  # new device memory holds whatever it held: start from zeros, as host
            core.memset(self.ptr, 0, self.size, self.device, self.backend)  # memfds do (same bytes, same chunks)
        self._state = [PRIVATE] * n
        self._keys: List[Optional[Tuple[str, Any]]] = [None] * n  # (key, fd maker) of each shared chunk
        self._view = None
        self._scratch: Optional[Any] = None  # where chunks found in the broker are compared with ours
        self._scratch_view: Any = None
        self._lock = threading.Lock()
        self._saved: Optional[Dict[int, Any]] = None  # while suspended: private chunk index -> its bytes
        self.closed = False
        # an arena dropped without close() still gives back its holds on shared chunks
        self._finalizer = weakref.finalize(self, _drop_holds, self._keys)
        with _arenas_lock:
            _arenas.add(self)
        _publish_stats()
        from glake import suspension

        suspension.register(self)  # glake.suspend() gives its memory back too

    @property
    def ptr(self) -> int:
        """First address of the arena."""
        return self.range.ptr

    @property
    def size(self) -> int:
        """Bytes the arena spans (whole chunks)."""
        return self.range.size

    def tensor(self) -> Any:
        """A ``torch.uint8`` tensor over the whole arena (on its GPU for cuda, on the CPU for host)."""
        if self._view is None:
            self._view = self._byte_view(self.range)
        return self._view

    def _byte_view(self, rng: Any) -> Any:
        torch = _torch()
        if self.backend == "cuda":
            return torch.as_tensor(rng, device=torch.device("cuda", self.device))
        import numpy as np

        return torch.from_numpy(np.asarray(rng))

    # ---- sharing -------------------------------------------------------------------------------

    def share(self, offset: int = 0, nbytes: Optional[int] = None) -> int:
        """Shares the chunks that ``[offset, offset + nbytes)`` covers whole (default: the arena).

        Waits for the device first: no kernel may be using the memory while its chunks are swapped.
        Returns the bytes of the arena that are now shared (this call's and earlier ones').
        """
        nbytes = self.size - offset if nbytes is None else int(nbytes)
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise InvalidArgumentError(f"Arena.share: [{offset}, {offset + nbytes}) is outside the arena's {self.size} bytes")
        with self._lock:
            self._check_open()
            first, last = -(-offset // self.chunk), (offset + nbytes) // self.chunk
            todo = [i for i in range(first, last) if self._state[i] == PRIVATE]
            if todo:
                if self.backend == "cuda":
                    _torch().cuda.synchronize(self.device)
                view = self.tensor()
                t0 = time.perf_counter_ns()
                hashes = content.digests(view, [i * self.chunk for i in todo], self.chunk)
                _totals["hash_ns"] += time.perf_counter_ns() - t0
                _totals["hash_bytes"] += len(todo) * self.chunk
                where = _device_key(self.backend, self.device)
                keys = [f"{where}:{self.chunk}:{h}" for h in hashes]
                for at in range(0, len(todo), wire.MAX_FDS):
                    self._share_batch(todo[at:at + wire.MAX_FDS], keys[at:at + wire.MAX_FDS])
            return sum(self.chunk for s in self._state if s != PRIVATE)

    def _fd_maker(self, i: int):
        """Exports chunk `i` anew (the broker client republishes held chunks after a broker restart);
        None once the arena is gone. Holds no reference to the arena or its chunks."""
        ref = weakref.ref(self)

        def new_fd() -> Optional[int]:
            a = ref()
            if a is None or a.closed or a._chunks[i] is None:  # gone, or suspended
                return None
            return a._chunks[i].export_fd()
        return new_fd

    def _share_batch(self, idx: List[int], keys: List[str]) -> None:
        """Shares chunks `idx` (at most wire.MAX_FDS of them) under their content `keys`, in a few round
        trips for all of them: look the keys up, publish those nobody has (ours become canonical), compare
        the chunks found with ours in one pass, hold the equal ones and map them in place of ours."""
        broker, makers = client(), [self._fd_maker(i) for i in idx]
        fds: List[Optional[int]] = []
        try:
            fds = broker.lookup(keys)
            new = [j for j, fd in enumerate(fds) if fd is None]
            if new:
                others = broker.publish([keys[j] for j in new], self.chunk, [makers[j] for j in new])
                for j, other in zip(new, others):
                    fds[j] = other
                    if other is None:  # ours is the canonical chunk now: nobody may write it any more
                        self._state[idx[j]], self._keys[idx[j]] = CANONICAL, (keys[j], makers[j])
                self._read_only([idx[j] for j, other in zip(new, others) if other is None])
            found = [j for j, fd in enumerate(fds) if fd is not None]
            theirs: List[Any] = []
            try:
                for j in found:
                    theirs.append(core.PhysChunk.import_fd(fds[j], self.chunk, self.device, self.backend))
            except BaseException:
                for c in theirs:
                    c.release()
                raise
        except GlakeError as e:  # the broker refused (e.g. out of fds): these chunks stay private
            return _broker_refused(e)
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
        try:
            same = self._same_bytes([idx[j] for j in found], theirs)
        except BaseException:
            for c in theirs:
                c.release()
            raise
        same_js, same_chunks = [], []
        for j, c, ok in zip(found, theirs, same):
            if not ok:
                c.release()  # a hash collision: this chunk stays private
                _totals["mismatches"] += 1
            else:
                same_js.append(j)
                same_chunks.append(c)
        if not same_js:
            return
        try:
            held = broker.hold([keys[j] for j in same_js], [makers[j] for j in same_js], self.chunk)
        except GlakeError as e:
            for c in same_chunks:
                c.release()
            return _broker_refused(e)
        again = [j for j, c, ok in zip(same_js, same_chunks, held) if not ok]
        for j, c, ok in zip(same_js, same_chunks, held):
            if not ok:
                c.release()  # its last holder let go meanwhile: offer ours instead
        swaps = [(j, c) for j, c, ok in zip(same_js, same_chunks, held) if ok]
        for n, (j, c) in enumerate(swaps):
            try:
                self._swap_in(idx[j], c, keys[j], makers[j])
            except BaseException:  # this chunk and the ones after it stay ours: give their holds back
                for j2, c2 in swaps[n:]:
                    c2.release()
                    broker.drop(keys[j2], makers[j2])
                raise
        if again:
            self._share_batch([idx[j] for j in again], [keys[j] for j in again])

    def _swap_in(self, i: int, theirs: Any, key: str, maker: Any) -> None:
        """Maps `theirs` read-only at chunk `i` in place of ours and frees ours; when the driver fails,
        ours is mapped back (read-write, as it was) and the error raised."""
        at = i * self.chunk
        self.range.unmap(at)
        try:
            self.range.map(at, theirs, set_access=False)
            try:
                self.range.set_access(at, self.chunk, read_only=True)
            except BaseException:
                self.range.unmap(at)
                raise
        except BaseException:
            self.range.map(at, self._chunks[i])
            raise
        self._chunks[i].release()  # freed: this process now reads the canonical chunk there
        self._chunks[i], self._state[i], self._keys[i] = theirs, IMPORTED, (key, maker)

    def _read_only(self, idx: List[int]) -> None:
        """Makes chunks `idx` (ascending) readable only, one driver call per run of adjacent chunks."""
        for first, count in content.runs(idx):
            self.range.set_access(first * self.chunk, count * self.chunk, read_only=True)

    def _same_bytes(self, idx: List[int], theirs: List[Any]) -> List[bool]:
        """Whether each chunk of `theirs` holds the bytes of this arena's chunk idx[n]: mapped read-only
        side by side in a scratch range and compared in one pass."""
        if not theirs:
            return []
        if self._scratch is None:
            self._scratch = core.VirtualRange(wire.MAX_FDS * self.chunk, self.device, self.backend)
            self._scratch_view = self._byte_view(self._scratch)
        mapped = 0
        try:
            for n, c in enumerate(theirs):
                self._scratch.map(n * self.chunk, c, set_access=False)
                mapped += 1
            self._scratch.set_access(0, len(theirs) * self.chunk, read_only=True)
            t0 = time.perf_counter_ns()
            same = content.equal_chunks(self.tensor(), idx, self._scratch_view, self.chunk)
            _totals["compare_ns"] += time.perf_counter_ns() - t0
            _totals["compare_bytes"] += len(theirs) * self.chunk
            return same
        finally:
            for n in range(mapped):
                self._scratch.unmap(n * self.chunk)

    # ---- figures and end -----------------------------------------------------------------------

    def stats(self) -> Dict[str, int]:
        """``shared_bytes`` (chunks now shared: canonical or imported), ``saved_bytes`` (imported: memory
        this process did not need), ``private_bytes``, and the chunk counts."""
        counts = {s: self._state.count(s) for s in (PRIVATE, CANONICAL, IMPORTED)}
        return {"shared_bytes": (counts[CANONICAL] + counts[IMPORTED]) * self.chunk,
                "saved_bytes": counts[IMPORTED] * self.chunk, "private_bytes": counts[PRIVATE] * self.chunk,
                "chunks_canonical": counts[CANONICAL], "chunks_imported": counts[IMPORTED],
                "chunks_private": counts[PRIVATE]}

    def _check_open(self) -> None:
        if self.closed:
            raise InvalidArgumentError("this dedup Arena is closed")
        if self._saved is not None:
            raise InvalidArgumentError("this dedup Arena is suspended: call glake.resume() first")

    # ---- suspension (glake.suspend / glake.resume) -----------------------------------------------

    @property
    def device_index(self) -> int:
        """The device ordinal (what glake.suspend matches by)."""
        return self.device

    @property
    def suspended(self) -> bool:
        """True between :meth:`suspend` and :meth:`resume`."""
        return self._saved is not None

    def suspend(self, discard: bool = False, engine: Any = None) -> None:
        """Gives the arena's memory back while its addresses stay reserved (``glake.suspend`` calls it).

        Private chunks are copied to host memory (not with ``discard``: they come back zeroed) and
        released. Shared chunks are unmapped, not copied: this process keeps its hold on each, so the
        broker keeps the chunk (and other processes keep reading it) until the resume maps it again.
        The copies are torch's (``engine`` is accepted for glake.suspend's interface, not used: an
        arena's private part is its few chunks that found no twin). No-op when already suspended.
        """
        del engine
        with self._lock:
            if self.closed or self._saved is not None:
                return
            if self.backend == "cuda":
                _torch().cuda.synchronize(self.device)
            view = self.tensor()
            saved = {i: None if discard else view[i * self.chunk:(i + 1) * self.chunk].to("cpu", copy=True)
                     for i, st in enumerate(self._state) if st == PRIVATE}
            for i, c in enumerate(self._chunks):
                self.range.unmap(i * self.chunk)
                c.release()  # a shared chunk lives on in the broker's fd and the other processes
                self._chunks[i] = None
            self._saved = saved

    def resume(self, engine: Any = None) -> None:
        """Maps the arena's chunks again at the same addresses: shared ones re-imported from the broker
        (read-only), private ones made anew with their bytes copied back. Raises (and stays suspended,
        so it can be called again) when the device has no memory or a shared chunk cannot be had."""
        del engine
        with self._lock:
            if self._saved is None:
                return
            made: Dict[int, Any] = {}
            shared = [i for i, st in enumerate(self._state) if st != PRIVATE]
            try:
                for i, st in enumerate(self._state):
                    if st == PRIVATE:
                        made[i] = core.PhysChunk(self.chunk, self.device, self.backend)
                for at in range(0, len(shared), wire.MAX_FDS):  # the shared ones, 64 per round trip
                    batch = shared[at:at + wire.MAX_FDS]
                    fds = client().lookup([self._keys[i][0] for i in batch])
                    try:
                        for i, fd in zip(batch, fds):
                            if fd is None:
                                raise GlakeError(f"dedup Arena.resume: the broker no longer has shared chunk {i} "
                                                 f"({self._keys[i][0]}); it restarted while every holder was suspended")
                            made[i] = core.PhysChunk.import_fd(fd, self.chunk, self.device, self.backend)
                    finally:
                        for fd in fds:
                            if fd is not None:
                                os.close(fd)
            except BaseException:
                for c in made.values():
                    c.release()
                raise
            for i in range(len(self._state)):
                self.range.map(i * self.chunk, made[i], set_access=self._state[i] == PRIVATE)
                self._chunks[i] = made[i]
            self._read_only(shared)
            view = self.tensor()
            for i, data in self._saved.items():
                part = view[i * self.chunk:(i + 1) * self.chunk]
                if data is None:
                    part.zero_()
                else:
                    part.copy_(data)
            if self.backend == "cuda":
                _torch().cuda.synchronize(self.device)
            self._saved = None

    def close(self) -> None:
        """Unmaps everything and gives back this arena's holds on shared chunks. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.backend == "cuda":
                _torch().cuda.synchronize(self.device)
            self._view = None
            self.range.free()
            if self._scratch is not None:
                self._scratch.free()
            for c in self._chunks:
                if c is not None:  # None: released by a suspend
                    c.release()
            self._chunks = []
            self._saved = None
            self._finalizer()
        with _arenas_lock:
            _arenas.discard(self)

    def __enter__(self) -> "Arena":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats() if not self.closed else {}
        return (f"<glake.dedup.Arena {self.size} B at {self.ptr:#x} on {self.backend}:{self.device}"
                + (f", {s['shared_bytes']} B shared>" if s else ", closed>"))


def _broker_refused(e: Exception) -> None:
    _totals["broker_errors"] += 1
    _totals["last_broker_error"] = str(e)


def _drop_holds(keys: List[Optional[Tuple[str, Any]]]) -> None:
    for n, held in enumerate(keys):
        if held is not None:
            client().drop(*held)
            keys[n] = None


def arena_of(ptr: int, nbytes: int) -> Arena:
    """The open arena holding ``[ptr, ptr + nbytes)``."""
    with _arenas_lock:
        for a in list(_arenas):
            if not a.closed and a.ptr <= ptr and ptr + nbytes <= a.ptr + a.size:
                return a
    raise InvalidArgumentError(
        f"glake.dedup: [{ptr:#x}, +{nbytes}) is not in a dedup arena; share weights with glake.dedup.share(...) "
        "or write them into a glake.dedup.Arena first (memory of glake's caching allocator is not shared in place)")


def stats() -> Dict[str, float]:
    """This process's dedup figures over its open arenas, and the hash and compare throughput so far."""
    with _arenas_lock:
        arenas = [a for a in _arenas if not a.closed]
    out: Dict[str, float] = {"arenas": len(arenas)}
    for a in arenas:
        for k, v in a.stats().items():
            out[k] = out.get(k, 0) + v
    for k in ("shared_bytes", "saved_bytes", "private_bytes"):
        out.setdefault(k, 0)
    out.update({k: v for k, v in _totals.items()})
    out["hash_gbps"] = _totals["hash_bytes"] / _totals["hash_ns"] if _totals["hash_ns"] else 0.0
    out["compare_gbps"] = _totals["compare_bytes"] / _totals["compare_ns"] if _totals["compare_ns"] else 0.0
    return out


_published = False


def _publish_stats() -> None:
    """Registers dedup's figures with glake.stats once (``glake stats`` / ``glake top`` show them)."""
    global _published
    if not _published:
        from glake.stats.sources import register_source

        register_source("dedup", stats, replace=True)
        _published = True
