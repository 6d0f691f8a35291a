"""KVCache: the vTensor KV-cache manager (virtually contiguous KV, chunks mapped on demand).

One address range holds every slot's KV rows (see :mod:`glake.kvcache.layout`); ``k_cache(l)`` and
``v_cache(l)`` are fixed strided torch tensors over it. Physical 2 MiB chunks from a
:class:`glake.core.ChunkPool` (capped by the memory budget) are mapped into a slot as its sequence
grows:

- ``reserve(slot, n)`` is the engine's per-step call. When tokens ``[0, n)`` are already backed it
  costs a dict lookup and a few integer compares and never takes a lock or calls the driver; when
  ``n`` comes within ``lookahead_tokens`` of the backed capacity it also queues the slot for the
  background :class:`~glake.kvcache.mapper.Mapper`; only when ``n`` exceeds the capacity does it map
  synchronously (counted as a wait in ``stats()``).
- ``release(slot)`` keeps the slot's chunks mapped (deferred reclamation): ``allocate()`` hands out
  the most recently released slot first, whose chunks need no driver call, and chunks of released
  slots (least recently released first) are reclaimed whenever new backing exceeds the budget.
- ``fork(src, n)`` maps the chunks holding only prefix bytes into a new slot (the same physical
  chunks, refcounted) and copies the partial tail chunk.
- ``swap_out`` / ``swap_in`` park a sequence's bytes in (pinned) host memory.

Threading contract: one engine thread calls the methods; the mapper thread is the only other one.
The slot tables are guarded by one lock (held across driver calls, which release the GIL).
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
import weakref
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from glake import core
from glake.stats.sources import next_serial, register_section, unregister
from glake.units import parse_bytes
from glake.errors import GlakeError, InvalidArgumentError
from glake.kvcache.layout import KVLayout
from glake.kvcache.mapper import Mapper
from glake.kvcache.swap import SwapHandle, copy_in, copy_out, host_buffer
from glake.kvcache.slots import ACTIVE, NEVER, Slot, SlotBook, checked_index
from glake.kvcache.stats import CacheIntrospection
from glake.kvcache.supply import ChunkSupply
from glake.kvcache.table import ChunkTable

TRIM_BATCH = 16  # surplus chunks the mapper unmaps from one slot per pass (bounds its lock hold)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float64": torch.float64, "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
           "float8_e5m2": getattr(torch, "float8_e5m2", None)}


def _as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = _DTYPES.get(str(dtype).replace("torch.", ""))
    if d is None:
        names = sorted(k for k, v in _DTYPES.items() if v)
        raise InvalidArgumentError(f"dtype={dtype!r} is not a torch dtype or one of {names}")
    return d


def _as_device_index(device: Union[None, int, str, torch.device], backend: str) -> int:
    if device is None:
        return 0
    if isinstance(device, (str, torch.device)):
        d = torch.device(device)
        want = "cuda" if backend == "cuda" else "cpu"
        if d.type != want:
            raise InvalidArgumentError(f"device={device!r} does not match the {backend} backend (expected {want})")
        return d.index or 0
    return checked_index("device", device, 0, None)


class KVCache(SlotBook, ChunkSupply, CacheIntrospection):
    """Virtually contiguous KV cache for ``max_seqs`` sequences of up to ``max_seq_len`` tokens.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim
        The model's KV shape.
    dtype
        Element type of the cache (``torch.bfloat16``, ``"float16"``, ...).
    max_seqs, max_seq_len
        Slots, and tokens per slot.
    memory_budget
        Bytes of physical memory the cache may hold (rounded down to whole chunks), an int or a
        string such as ``"8GB"`` (the syntax of every glake size); None = no cap but the device's
        (chunks of released slots are then reclaimed when the device is full).
    device
        Device ordinal (or ``"cuda:N"``); None = 0.
    backend
        ``"cuda"`` or ``"host"``; None = ``$GLAKE_BACKEND`` or auto-detect.
    lookahead_tokens
        The mapper keeps each growing sequence backed this many tokens past its reserved length;
        0 = no background thread, every mapping is synchronous.

    Raises
    ------
    InvalidArgumentError
        A non-positive size, unknown dtype, or a budget below one chunk.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: Union[str, torch.dtype],
                 max_seqs: int, max_seq_len: int, memory_budget: Union[None, int, str] = None,
                 device: Union[None, int, str, torch.device] = None, backend: Optional[str] = None,
                 lookahead_tokens: int = 2) -> None:
        self.backend = core.backend_name(backend)
        self.device_index = _as_device_index(device, self.backend)
        self.dtype = _as_dtype(dtype)
        self.device = torch.device("cuda", self.device_index) if self.backend == "cuda" else torch.device("cpu")
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        g = core.granularity(self.backend, self.device_index)
        self.layout = KVLayout(num_layers, num_kv_heads, head_dim, itemsize, max_seqs, max_seq_len, g)
        self.lookahead_tokens = checked_index("lookahead_tokens", lookahead_tokens, 0, None)
        if memory_budget is None:
            self._budget_chunks: Optional[int] = None
        else:
            b = parse_bytes(memory_budget, "memory_budget")
            if b < g:
                raise InvalidArgumentError(f"memory_budget={b} is below one chunk ({g} bytes)")
            self._budget_chunks = b // g
        self._on_cuda = self.backend == "cuda"
        self._lock = threading.RLock()
        self._pool = core.ChunkPool(limit_bytes=(self._budget_chunks or 0) * g, device=self.device_index,
                                    backend=self.backend)
        self._table = ChunkTable(self.layout, self.device_index, self.backend)
        self._slots = [Slot(i) for i in range(max_seqs)]
        self._active: Dict[int, Slot] = {}
        self._idle: "collections.OrderedDict[int, None]" = collections.OrderedDict()  # oldest release first
        self._free: List[int] = list(range(max_seqs - 1, -1, -1))  # a stack: slot 0 comes out first
        self._token = object()  # identifies this cache's swap handles
        self._closed = False
        self._mapper_error: Optional[BaseException] = None
        self._starved: set = set()  # slots whose lookahead the mapper could not back
        self._n = collections.Counter()  # event counters, see stats()
        try:
            self._build_views()
        except BaseException:
            self._table.free()
            raise
        self._mapper = Mapper(self) if self.lookahead_tokens > 0 else None
        if self._mapper is not None:
            self._finalizer = weakref.finalize(self, self._mapper.stop)
        self._stats_key = register_section(  # glake stats / top show it while it is open
            "kvcache", self, device=self.device_index,
            labels={"cache": str(next_serial()), "backend": self.backend, "layers": str(self.layout.num_layers)})

    # ---- views -----------------------------------------------------------------------------------

    def _build_views(self) -> None:
        rng = self._table.range
        if self._on_cuda:
            # torch.as_tensor asks the driver which device owns the first byte (cudaPointerGetAttributes),
            # which fails on reserved-but-unmapped addresses: back that byte for the moment.
            chunk = core.PhysChunk(device=self.device_index, backend=self.backend)  # not the pool's: freed below
            rng.map(0, chunk)
            try:
                base = torch.as_tensor(rng, device=self.device)
            finally:
                rng.unmap(0)
                chunk.release()
        else:
            base = torch.from_numpy(np.asarray(rng))
        self._bytes = base  # uint8 over the whole range
        typed = base.view(self.dtype)
        lay = self.layout

        def view(layer: int, kv: int) -> torch.Tensor:
            return torch.as_strided(typed, lay.view_shape, lay.view_strides, lay.view_storage_offset(layer, kv))

        self._k = [view(layer, 0) for layer in range(lay.num_layers)]
        self._v = [view(layer, 1) for layer in range(lay.num_layers)]

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K cache: a strided tensor ``[max_seqs, max_seq_len, num_kv_heads, head_dim]``.

        Always the same tensor (fixed addresses, CUDA-graph friendly). Only tokens below a slot's
        capacity are backed: touching others is an illegal address (SIGSEGV on the host backend).
        """
        try:
            if type(layer) is int and layer >= 0:
                return self._k[layer]
            return self._k[checked_index("layer", layer, 0, None)]
        except IndexError:
            self._check_open()
            raise InvalidArgumentError(f"layer={layer} is out of range [0, {self.layout.num_layers - 1}]") from None
        except AttributeError:
            raise InvalidArgumentError("this KVCache is closed") from None

    def v_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s V cache (see :meth:`k_cache`)."""
        try:
            if type(layer) is int and layer >= 0:
                return self._v[layer]
            return self._v[checked_index("layer", layer, 0, None)]
        except IndexError:
            self._check_open()
            raise InvalidArgumentError(f"layer={layer} is out of range [0, {self.layout.num_layers - 1}]") from None
        except AttributeError:
            raise InvalidArgumentError("this KVCache is closed") from None

    # ---- properties ------------------------------------------------------------------------------

    @property
    def tokens_per_chunk(self) -> Union[int, float]:
        """``2 MiB / row``: an int when the row divides the chunk, else a float (rows straddle chunks)."""
        return self.layout.tokens_per_chunk

    @property
    def memory_budget(self) -> Optional[int]:
        """The budget in bytes (whole chunks), or None."""
        return None if self._budget_chunks is None else self._budget_chunks * self.layout.chunk_bytes

    @property
    def physical_chunks(self) -> int:
        """Distinct physical chunks mapped right now (a lock-free gauge, cheap enough for every step)."""
        return len(self._table.refs)

    @property
    def sync_waits(self) -> int:
        """Reserve calls so far that had to map synchronously (lock-free; compare across a step)."""
        return self._n["sync_waits"]

    @property
    def base_ptr(self) -> int:
        """Address of slot 0, token 0 (the start of the reserved range)."""
        self._check_open()
        return self._table.range.ptr

    def chunk_ids(self, slot: int) -> List[Optional[int]]:
        """Ids of the physical chunks mapped at each chunk index of ``slot`` (None = unmapped), any state.

        Two slots showing the same id share that physical chunk (a fork prefix).
        """
        with self._lock:
            self._check_open()
            i = checked_index("slot", slot, 0, self.layout.max_seqs - 1)
            return [None if c is None else c.id for c in self._table.chunks[i]]

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    # ---- slot lifecycle --------------------------------------------------------------------------

    def allocate(self) -> int:
        """A slot for a new sequence, with capacity for whatever chunks it kept from its last sequence.

        Raises
        ------
        OutOfMemoryError
            All ``max_seqs`` slots hold live sequences.
        """
        with self._lock:
            self._check_open()
            i = self._take_slot(prefer_chunk0=None)
            self._activate(i, target=0)
            return i

    def release(self, slot: int) -> None:
        """Ends the sequence in ``slot``; its chunks stay mapped for the next sequence until needed elsewhere."""
        with self._lock:
            st = self._active_slot(slot)
            del self._active[st.index]
            st.target = st.hint = 0
            st.watermark = NEVER
            if self._on_cuda and self._table.count(st.index):
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self._table.set_fence(st.index, done.synchronize)  # before any of its chunks is unmapped
            self._park(st)
            self._n["releases"] += 1
            self._wake_starved()

    def reserve(self, slot: int, length: int) -> None:
        """Guarantees backing for tokens ``[0, length)`` of ``slot`` (the engine's per-step call).

        Cheap (no lock, no driver call) when the backing exists; pass Python ints for that path.

        Raises
        ------
        OutOfMemoryError
            The budget (after reclaiming released slots' and other sequences' lookahead chunks)
            cannot back ``length`` tokens; nothing changed.
        InvalidArgumentError
            ``slot`` is not a live sequence, or ``length`` is outside ``[0, max_seq_len]``.
        GlakeError
            The background mapper failed since the last call (raised once; the cache stays usable).
        """
        if self._mapper_error is not None:
            self._raise_mapper_error()
        st = self._active.get(slot)
        if st is not None and type(length) is int and length >= 0:
            t = st.target
            if length <= t:
                return  # guaranteed by an earlier call
            # Publish the new target *before* reading the capacity: the mapper, which may unmap a
            # live slot's chunks past its target, publishes the lower capacity before re-reading
            # the target (see _background_pass). Whichever order the two threads run in, either
            # this call sees the lower capacity (and takes the locked path) or the mapper sees
            # this target (and keeps the chunks). The GIL makes these loads and stores ordered.
            st.target = length
            if length <= st.capacity:
                if length > st.watermark:
                    st.watermark = NEVER
                    self._mapper.request(st.index)  # type: ignore[union-attr]  (watermark < NEVER only with a mapper)
                return
            st.target = t  # not backed: undo, and map under the lock
        self._reserve_slow(slot, length)

    def _reserve_slow(self, slot: int, length: int) -> None:
        t0 = time.perf_counter_ns()
        with self._lock:
            st = self._active_slot(slot)
            n = checked_index("length", length, 0, self.layout.max_seq_len)
            if n <= st.capacity:
                if n > st.target:
                    st.target = n
                    self._refresh(st)
                return
            self._grow(st, self.layout.chunks_for(n), strict=True, length=n)
            st.target = max(st.target, n)
            self._refresh(st)
        self._n["sync_waits"] += 1
        self._n["wait_ns"] += time.perf_counter_ns() - t0

    def prefetch(self, slot: int, length: int) -> None:
        """Asks the mapper to back tokens ``[0, length)`` of ``slot`` in the background; guarantees nothing.

        For a length the engine will reserve soon (a queued request's prompt, admitted next step).
        Lock-free and cheap; a no-op without a mapper (``lookahead_tokens=0``). Chunks prefetched
        but not yet reserved may be reclaimed by other sequences' synchronous reservations.
        """
        st = self._active.get(slot)
        if st is None or type(length) is not int:
            st = self._active_slot(slot)
            length = checked_index("length", length, 0, self.layout.max_seq_len)
        length = min(max(length, 0), self.layout.max_seq_len)
        if length > st.hint and self._mapper is not None:
            st.hint = length
            st.watermark = NEVER
            self._mapper.request(st.index)

    def capacity(self, slot: int) -> int:
        """Tokens ``[0, capacity)`` of ``slot`` are backed right now."""
        return self._active_slot(slot).capacity

    def reserved(self, slot: int) -> int:
        """The longest length ``reserve`` guaranteed for ``slot``'s sequence."""
        return self._active_slot(slot).target

    # ---- fork ------------------------------------------------------------------------------------

    def fork(self, src: int, prefix_len: int) -> int:
        """A new slot whose tokens ``[0, prefix_len)`` are ``src``'s, without copying full chunks.

        Chunks holding only prefix bytes are the same physical chunks mapped again (refcounted); the
        partial tail chunk is copied (on the current stream on cuda). Neither slot may write into the
        shared chunks afterwards (:meth:`check_writable`, :meth:`first_writable`).

        Raises
        ------
        InvalidArgumentError
            ``src`` is not live or ``prefix_len`` exceeds its reserved length.
        OutOfMemoryError
            No free slot, or no chunk for the tail within the budget; nothing changed.
        """
        with self._lock:
            s = self._active_slot(src)
            p = checked_index("prefix_len", prefix_len, 0, s.target)
            lay, tab = self.layout, self._table
            n_full = lay.full_chunks_of_prefix(p)
            tail = p * lay.row_bytes - n_full * lay.chunk_bytes
            src_chunks = [tab.chunk(s.index, i) for i in range(n_full)]
            d = self._take_slot(prefer_chunk0=src_chunks[0].id if n_full else None)
            # what must go from the destination: chunks in the prefix that are not the source's,
            # and any chunk shared with someone else (it would be written to)
            drop = [i for i in tab.indices(d)
                    if (i < n_full and tab.chunk(d, i).id != src_chunks[i].id) or (i >= n_full and tab.is_shared(d, i))]
            tail_reuse = bool(tail) and tab.chunk(d, n_full) is not None and n_full not in drop
            if tail and not tail_reuse:
                freed = sum(1 for i in drop if not tab.is_shared(d, i))  # back to the pool when dropped
                own = sum(1 for i in tab.exclusive_indices(d) if i > n_full and i not in drop)  # movable
                self._check_budget(1 - freed - own, d, n_full + 1, f"the copied tail of fork({src}, {p})")
            self._activate(d, target=0, unmap_shared=False)
            try:
                for i in reversed(drop):
                    tab.unmap(d, i)
                self._n["unmaps"] += len(drop)
                holes = tab.holes(d, n_full)
                tab.map_at(d, holes, [src_chunks[i] for i in holes])
                self._n["maps_shared"] += len(holes)
                if tail:
                    if not tail_reuse:
                        c = self._obtain(1, d, n_full + 1, True, f"the copied tail of fork({src}, {p})")
                        tab.map_at(d, [n_full], c)
                        self._n["maps_sync"] += 1
                    at = n_full * lay.chunk_bytes
                    so, do = lay.slot_offset(s.index) + at, lay.slot_offset(d) + at
                    self._bytes[do:do + tail].copy_(self._bytes[so:so + tail])
                    self._n["fork_tail_bytes"] += tail
            except BaseException:
                self._deactivate(self._slots[d])
                raise
            st = self._slots[d]
            st.target = p
            self._refresh(st)
            self._n["forks"] += 1
            return d

    def check_writable(self, slot: int, start: int, end: int) -> None:
        """Raises unless tokens ``[start, end)`` of ``slot`` are backed and in no shared chunk."""
        with self._lock:
            st = self._active_slot(slot)
            a = checked_index("start", start, 0, None)
            b = checked_index("end", end, a, None)
            if b > st.capacity:
                raise InvalidArgumentError(f"tokens [{a}, {b}) of slot {st.index} are not all backed (capacity "
                                           f"{st.capacity}): reserve({st.index}, {b}) first")
            first, last = self.layout.chunk_span(a, b)
            for i in range(first, last):
                if self._table.is_shared(st.index, i):
                    raise InvalidArgumentError(
                        f"refusing to write tokens [{a}, {b}) of slot {st.index}: chunk {i} is shared by "
                        f"{self._table.refs[self._table.chunk(st.index, i).id]} slots (a fork prefix); the first "
                        f"writable token is {self._first_writable(st.index)}")

    def first_writable(self, slot: int) -> int:
        """The first token of ``slot`` that lies in no shared chunk (0 when nothing is shared)."""
        with self._lock:
            return self._first_writable(self._active_slot(slot).index)

    def _first_writable(self, i: int) -> int:
        last_shared = -1
        for j in self._table.indices(i):
            if self._table.is_shared(i, j):
                last_shared = j
        return self.layout.first_token_after_chunks(last_shared + 1)

    def write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes ``k``/``v`` (``[n, num_kv_heads, head_dim]``) at tokens ``[start, start+n)``, after
        :meth:`check_writable`. The checked path for engines that want the refusal; the views are the fast one."""
        if k.shape != v.shape or k.dim() != 3:
            raise InvalidArgumentError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [n, heads, head_dim]")
        self.check_writable(slot, start, start + k.shape[0])
        self.k_cache(layer)[slot, start:start + k.shape[0]] = k
        self.v_cache(layer)[slot, start:start + v.shape[0]] = v

    # ---- swap ------------------------------------------------------------------------------------

    def swap_out(self, slot: int, length: Optional[int] = None) -> SwapHandle:
        """Copies tokens ``[0, length)`` (default: the reserved length) of ``slot`` to host memory,
        unmaps the slot's chunks (back to the pool) and frees the slot. Shared prefix chunks are
        copied too: the sequence comes back with private chunks."""
        with self._lock:
            st = self._active_slot(slot)
            n = st.target if length is None else checked_index("length", length, 0, st.target)
            nbytes = n * self.layout.row_bytes
            buf = host_buffer(nbytes, pinned=self._on_cuda)
            off = self.layout.slot_offset(st.index)
            if nbytes:
                copy_out(self._bytes[off:off + nbytes], buf, self._on_cuda)
            del self._active[st.index]
            self._n["unmaps"] += self._table.unmap_all(st.index)
            st.target = st.hint = 0
            self._park(st)
            self._wake_starved()
            self._n["swaps_out"] += 1
            self._n["bytes_swapped_out"] += nbytes
            return SwapHandle(n, nbytes, st.index, buf, self._token)

    def swap_in(self, handle: SwapHandle) -> int:
        """Maps fresh chunks into a free slot, copies the handle's bytes back and returns the slot.

        Raises
        ------
        OutOfMemoryError
            No slot or not enough chunks within the budget; the handle stays valid.
        InvalidArgumentError
            The handle belongs to another cache or was already swapped in.
        """
        with self._lock:
            self._check_open()
            if not isinstance(handle, SwapHandle) or handle._owner is not self._token:
                raise InvalidArgumentError("swap_in: the handle does not come from this KVCache's swap_out")
            if handle.consumed:
                raise InvalidArgumentError("swap_in: this SwapHandle was already swapped in or discarded")
            i = self._take_slot(prefer_chunk0=None)
            self._activate(i, target=0)
            st = self._slots[i]
            try:
                if handle.length > st.capacity:
                    self._grow(st, self.layout.chunks_for(handle.length), strict=True, length=handle.length)
                if handle.nbytes:
                    off = self.layout.slot_offset(i)
                    copy_in(handle.buffer, self._bytes[off:off + handle.nbytes], self._on_cuda)
            except BaseException:
                self._deactivate(st)
                raise
            st.target = handle.length
            self._refresh(st)
            handle.discard()
            self._n["swaps_in"] += 1
            self._n["bytes_swapped_in"] += handle.nbytes
            return i

    # ---- memory ----------------------------------------------------------------------------------

    def num_free_chunks(self) -> int:
        """Chunks a reservation can still get: unused budget (or free device memory without a budget),
        chunks kept by released slots, and live sequences' chunks past their reserved length."""
        with self._lock:
            self._check_open()
            return self._pool_left() + len(self._idle_victims(-1)) + len(self._surplus_victims())

    def trim(self) -> int:
        """Unmaps every chunk kept by released slots and returns cached chunks to the driver; returns bytes freed."""
        with self._lock:
            self._check_open()
            for i in list(self._idle):
                self._n["unmaps"] += self._table.unmap_all(i)
                self._park(self._slots[i])
            return self._pool.trim(0)

    def wait_mapper(self, timeout: float = 60.0) -> bool:
        """Blocks until the background mapper has nothing queued (True at once without one)."""
        return True if self._mapper is None else self._mapper.wait_idle(timeout)

    # ---- internals: the mapper thread's side -----------------------------------------------------

    def _background_pass(self, slots: List[int]) -> None:
        """Runs on the mapper thread: tops up each queued live slot to ``reserved + lookahead_tokens``,
        and unmaps (into the pool) its chunks beyond that, at most ``TRIM_BATCH`` per pass."""
        for i in dict.fromkeys(slots):
            with self._lock:
                if self._closed:
                    return
                st = self._slots[i]
                if st.state != ACTIVE:
                    continue
                want = self._surplus_start(st)
                starved = False
                if want > self._table.ready[i]:
                    self._grow(st, want, strict=False)
                    starved = self._table.ready[i] < want
                    if starved:
                        self._starved.add(i)
                if st.target or st.hint:
                    self._trim(st, want)
                self._refresh(st, starved=starved)

    def _trim(self, st: Slot, keep: int) -> None:
        """Unmaps (into the pool) up to TRIM_BATCH of a live slot's unshared chunks at index >= keep.

        Runs on the mapper thread while the engine may be in reserve()'s lock-free path for this
        slot, so it first publishes the capacity it is about to leave, then re-reads the target
        the engine may have raised meanwhile, and keeps what that target needs (reserve() does the
        mirror image: it publishes the target, then reads the capacity).
        """
        i = st.index
        extra = [j for j in self._table.exclusive_indices(i) if j >= keep][-TRIM_BATCH:]
        if not extra:
            return
        st.capacity = self.layout.tokens_backed(min(self._table.ready[i], extra[0]))
        keep = max(keep, self.layout.chunks_for(st.target))
        extra = [j for j in extra if j >= keep]
        for j in reversed(extra):
            self._table.unmap(i, j)
        self._n["unmaps"] += len(extra)
        self._n["trimmed"] += len(extra)

    def _record_mapper_error(self, e: BaseException) -> None:
        # keep the traceback's lines but drop its frames' locals: they may hold chunks (which would
        # then stay "in use" for as long as the error is remembered)
        traceback.clear_frames(e.__traceback__)
        self._n["mapper_errors"] += 1
        if self._mapper_error is None:
            self._mapper_error = e

    def _raise_mapper_error(self) -> None:
        e, self._mapper_error = self._mapper_error, None
        raise GlakeError(f"KVCache: the background mapper failed: {type(e).__name__}: {e}") from e

    # ---- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the mapper, unmaps everything, frees the addresses and the pool's chunks. Idempotent.

        Tensors from :meth:`k_cache`/:meth:`v_cache` must not be used afterwards.
        """
        if self._closed:
            return
        unregister(self._stats_key)
        if self._mapper is not None:
            self._mapper.stop()
            self._finalizer.detach()
        with self._lock:
            self._closed = True
            if self._on_cuda:
                torch.cuda.synchronize(self.device)
            self._k = self._v = []
            del self._bytes
            self._active.clear()
            self._idle.clear()
            self._table.free()
            self._pool.trim(0)
            self._pool = None

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<glake.kvcache.KVCache closed>"
        return (f"<glake.kvcache.KVCache {self.backend}:{self.device_index} {self.dtype} {self.layout.describe()}; "
                f"{len(self._active)} live, {self._table.unique_chunks} chunks>")
