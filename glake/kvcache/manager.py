"""KVCache: the vTensor KV-cache manager's Python face over the C++ mechanism (``kvcache/`` in C++).

One address range holds every slot's KV rows (see :mod:`glake.kvcache.layout`); ``k_cache(l)`` and
``v_cache(l)`` are fixed strided torch tensors over it. The mechanism is ``glake._C.KvManager``: the
slot table, chunk accounting and memory budget, the background mapper thread (no GIL), trimming and
reclamation, fork bookkeeping, release fences (driver events, polled, never waited for under its
lock), the lengths array and suspension. This layer keeps the torch parts: the views, the fork tail
copy, the swap copies, the stream handles, and the device ``lengths`` tensor.

Threading contract: one engine thread calls the methods; the C++ mapper thread is the only other one.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from glake import _C, core
from glake.errors import GlakeError, InvalidArgumentError, OutOfMemoryError
from glake.kvcache.layout import KVLayout
from glake.kvcache.swap import SwapHandle, copy_in, copy_out, host_buffer
from glake.stats.sources import next_serial, register_section, unregister
from glake.units import parse_bytes

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float64": torch.float64, "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
           "float8_e5m2": getattr(torch, "float8_e5m2", None)}
_ERRORS = {"OutOfMemoryError": OutOfMemoryError, "InvalidArgumentError": InvalidArgumentError,
           "GlakeError": GlakeError}


def checked_index(name: str, value: object, lo: int, hi: Optional[int]) -> int:
    """``operator.index(value)`` checked to lie in ``[lo, hi]`` (hi None = no bound); InvalidArgumentError otherwise."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name}={value!r} must be an int")
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name}={value!r} must be an int") from None
    if v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidArgumentError(f"{name}={v} is out of range {bound}")
    return v


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


def _engine_handle(engine):
    """The ``_C.MultipathEngine`` of ``engine``: None, the handle itself, or a ``glake.multipath.Engine``."""
    return getattr(engine, "handle", engine)


class KVCache:
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

    Attributes
    ----------
    device : torch.device
        Where the views and :attr:`lengths` live (``cuda:N``, or ``cpu`` on the host backend).
    device_index : int
        The device ordinal (what ``glake.suspend`` matches the cache by).

    Raises
    ------
    InvalidArgumentError
        A non-positive size, unknown dtype, or a budget below one chunk.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: Union[str, torch.dtype],
                 max_seqs: int, max_seq_len: int, memory_budget: Union[None, int, str] = None,
                 device: Union[None, int, str, torch.device] = None, backend: Optional[str] = None,
                 lookahead_tokens: int = 2) -> None:
        self._closed = True  # until the C++ side exists
        self.backend = core.backend_name(backend)
        self.device_index = _as_device_index(device, self.backend)
        self.dtype = _as_dtype(dtype)
        self._on_cuda = self.backend == "cuda"
        self.device = torch.device("cuda", self.device_index) if self._on_cuda else torch.device("cpu")
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        g = core.granularity(self.backend, self.device_index)
        self.layout = KVLayout(num_layers, num_kv_heads, head_dim, itemsize, max_seqs, max_seq_len, g)
        self.lookahead_tokens = checked_index("lookahead_tokens", lookahead_tokens, 0, None)
        budget = None if memory_budget is None else parse_bytes(memory_budget, "memory_budget")
        self._m = _C.KvManager(self.layout.max_seqs, self.layout.max_seq_len, self.layout.row_bytes, budget,
                               self.lookahead_tokens, self.device_index, self.backend)
        self._closed = False
        self._budget_chunks = None if budget is None else budget // g
        self._token = object()  # identifies this cache's swap handles
        try:
            self._build_views()
        except BaseException:
            self._m.close()
            raise
        # each live slot's reserved length (0 otherwise), for attention's seqused_k: see reserve_batch
        self.lengths = torch.zeros(self.layout.max_seqs, dtype=torch.int32, device=self.device)
        self._stats_key = register_section(  # glake stats / top show it while it is open
            "kvcache", self, device=self.device_index,
            labels={"cache": str(next_serial()), "backend": self.backend, "layers": str(self.layout.num_layers)})
        from glake import suspension

        suspension.register(self)  # glake.suspend() gives its memory back too

    # ---- views -----------------------------------------------------------------------------------

    def _build_views(self) -> None:
        rng = self._m.range
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

    def _layer(self, views: List[torch.Tensor], layer: int) -> torch.Tensor:
        try:
            if type(layer) is int and layer >= 0:
                return views[layer]
            return views[checked_index("layer", layer, 0, None)]
        except IndexError:
            self._check_open()
            raise InvalidArgumentError(f"layer={layer} is out of range [0, {self.layout.num_layers - 1}]") from None

    def k_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K cache: a strided tensor ``[max_seqs, max_seq_len, num_kv_heads, head_dim]``.

        Always the same tensor (fixed addresses, CUDA-graph friendly). Only tokens below a slot's
        capacity are backed: touching others is an illegal address (SIGSEGV on the host backend).
        """
        return self._layer(self._k, layer)

    def v_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s V cache (see :meth:`k_cache`)."""
        return self._layer(self._v, layer)

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
        return self._m.physical_chunks

    @property
    def sync_waits(self) -> int:
        """Reserve calls so far that had to map synchronously (lock-free; compare across a step)."""
        return self._m.sync_waits

    @property
    def base_ptr(self) -> int:
        """Address of slot 0, token 0 (the start of the reserved range)."""
        return self._m.range.ptr

    @property
    def range(self) -> "core.VirtualRange":
        """The one reserved range every slot lives in (for introspection: ``chunk_at``, ``mappings``)."""
        return self._m.range

    @property
    def mapper_alive(self) -> bool:
        """True while the background mapper thread runs (False without one or after close)."""
        return self._m.mapper_alive

    def chunk_ids(self, slot: int) -> List[Optional[int]]:
        """Ids of the physical chunks mapped at each chunk index of ``slot`` (None = unmapped), any state.

        Two slots showing the same id share that physical chunk (a fork prefix).
        """
        return self._m.chunk_ids(slot)

    def chunk_refs(self) -> Dict[int, int]:
        """``{chunk id: places it is mapped at}`` over the whole cache (more than 1 = a shared fork prefix)."""
        return self._m.chunk_refs()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("this KVCache is closed")

    def _stream(self) -> int:
        """The engine's stream as the driver sees it (0 on the host backend). torch's raw lookup when it
        has one (what its compiled code uses): torch.cuda.current_stream() builds a Stream object, 5.3 µs
        of a 16 µs reserve_batch on an H200."""
        if not self._on_cuda:
            return 0
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is not None:
            return raw(self.device_index)
        return torch.cuda.current_stream(self.device).cuda_stream

    # ---- slot lifecycle --------------------------------------------------------------------------

    def allocate(self) -> int:
        """A slot for a new sequence, with capacity for whatever chunks it kept from its last sequence.

        Raises
        ------
        OutOfMemoryError
            All ``max_seqs`` slots hold live sequences.
        """
        return self._m.allocate()

    def release(self, slot: int) -> None:
        """Ends the sequence in ``slot``; its chunks stay mapped for the next sequence until needed elsewhere.

        A fence (a driver event) is recorded on the current stream first: no chunk of the slot is
        unmapped before the kernels queued so far have finished.
        """
        self._m.release(slot, self._stream())

    def reserve(self, slot: int, length: int) -> None:
        """Guarantees backing for tokens ``[0, length)`` of ``slot``.

        Cheap (no lock, no driver call, in C++) when the backing exists.

        Raises
        ------
        OutOfMemoryError
            The budget (after reclaiming released slots' and other sequences' lookahead chunks)
            cannot back ``length`` tokens; nothing changed.
        InvalidArgumentError
            ``slot`` is not a live sequence, or ``length`` is outside ``[0, max_seq_len]``.
        GlakeError
            The background mapper failed since the last call (raised once; the cache stays usable),
            or the cache is suspended (:meth:`suspend`).
        """
        if not self._m.reserve(slot, length):
            self._raise_mapper_error()

    def reserve_batch(self, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """The scheduler's per-step call: ``reserve(slots[k], lengths[k])`` for every k, all or nothing.

        ``slots`` and ``lengths`` are int sequences or integer numpy arrays (an int64 array is read
        in place). When every sequence is already backed this is one C++ loop with no lock. Then
        :attr:`lengths` is updated (see :meth:`publish_lengths`), and only then is the background
        mapper woken for the sequences nearing their backed end, so that its driver calls do not
        race the copy.

        Raises
        ------
        OutOfMemoryError
            The budget cannot back all of them; no slot changed (reserved lengths, capacities,
            chunks of the batch's slots are as before).
        InvalidArgumentError
            A slot that is not live or a length out of range; no slot changed.
        """
        if not self._m.reserve_batch(slots, lengths, self._lengths_ptr(), self._stream()):
            self._raise_mapper_error()

    def publish_lengths(self) -> None:
        """Brings :attr:`lengths` up to date: each slot's reserved length, 0 for slots with no live sequence.

        The contract: the C++ side keeps an int32 array of reserved lengths; this call copies it into
        a pinned staging buffer (one of 64, reused once the copies out of its group of 16 have
        completed) and enqueues an asynchronous copy to the device tensor on the current stream. Work
        queued on that stream afterwards sees the new values; nothing waits for the GPU unless it is
        about 48 publishes behind.
        :meth:`reserve_batch` calls it; after ``allocate``/``release``/``fork``/``swap_in`` or single
        ``reserve`` calls, call it before the attention that reads :attr:`lengths`. On the host
        backend the tensor is updated at once.
        """
        self._m.publish_lengths(self._lengths_ptr(), self._stream())

    def _lengths_ptr(self) -> int:
        return self.lengths.data_ptr()

    def can_reserve(self, slot: int, length: int) -> bool:
        """Whether ``reserve(slot, length)`` would succeed now (no exception, nothing changes)."""
        return self._m.can_reserve(slot, length)

    def free_tokens(self) -> int:
        """Tokens the chunks a reservation can still get would back: ``num_free_chunks() * 2 MiB // row``.

        A slot holding no chunk can reserve exactly this many tokens (up to ``max_seq_len``).
        """
        return self._m.free_tokens()

    def prefetch(self, slot: int, length: int) -> None:
        """Asks the mapper to back tokens ``[0, length)`` of ``slot`` in the background; guarantees nothing.

        For a length the engine will reserve soon (a queued request's prompt, admitted next step).
        Lock-free and cheap; a no-op without a mapper (``lookahead_tokens=0``). Chunks prefetched
        but not yet reserved may be reclaimed by other sequences' synchronous reservations.
        """
        self._m.prefetch(slot, length)

    def capacity(self, slot: int) -> int:
        """Tokens ``[0, capacity)`` of ``slot`` are backed right now."""
        return self._m.capacity(slot)

    def reserved(self, slot: int) -> int:
        """The longest length ``reserve`` guaranteed for ``slot``'s sequence."""
        return self._m.reserved(slot)

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
        d, so, do, n = self._m.fork(src, prefix_len)
        if n:
            try:
                self._bytes[do:do + n].copy_(self._bytes[so:so + n])
            except BaseException:
                self._m.release(d, self._stream())
                raise
        return d

    def check_writable(self, slot: int, start: int, end: int) -> None:
        """Raises unless tokens ``[start, end)`` of ``slot`` are backed and in no shared chunk."""
        self._m.check_writable(slot, start, end)

    def first_writable(self, slot: int) -> int:
        """The first token of ``slot`` that lies in no shared chunk (0 when nothing is shared)."""
        return self._m.first_writable(slot)

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
        n = self._m.swap_out_length(slot, length)
        nbytes = n * self.layout.row_bytes
        buf = host_buffer(nbytes, pinned=self._on_cuda)
        off = self.layout.slot_offset(slot)
        if nbytes:
            copy_out(self._bytes[off:off + nbytes], buf, self._on_cuda)  # waited for: no lock is held
        self._m.swap_out_finish(slot, nbytes)
        return SwapHandle(n, nbytes, slot, buf, self._token)

    def swap_in(self, handle: SwapHandle) -> int:
        """Maps fresh chunks into a free slot, copies the handle's bytes back and returns the slot.

        Raises
        ------
        OutOfMemoryError
            No slot or not enough chunks within the budget; the handle stays valid.
        InvalidArgumentError
            The handle belongs to another cache or was already swapped in.
        """
        self._check_open()
        if not isinstance(handle, SwapHandle) or handle._owner is not self._token:
            raise InvalidArgumentError("swap_in: the handle does not come from this KVCache's swap_out")
        if handle.consumed:
            raise InvalidArgumentError("swap_in: this SwapHandle was already swapped in or discarded")
        i = self._m.swap_in(handle.length, handle.nbytes)
        if handle.nbytes:
            off = self.layout.slot_offset(i)
            try:
                copy_in(handle.buffer, self._bytes[off:off + handle.nbytes], self._on_cuda)
            except BaseException:
                self._m.release(i, self._stream())
                raise
        handle.discard()
        return i

    # ---- memory ----------------------------------------------------------------------------------

    def num_free_chunks(self) -> int:
        """Chunks a reservation can still get: unused budget (or free device memory without a budget),
        chunks kept by released slots, and live sequences' chunks past their reserved length."""
        return self._m.num_free_chunks()

    def trim(self) -> int:
        """Unmaps every chunk kept by released slots and returns cached chunks to the driver; returns bytes freed.

        Released slots whose release fence has not completed yet keep their chunks (call it again later).
        """
        return self._m.trim()

    def wait_mapper(self, timeout: float = 60.0) -> bool:
        """Blocks until the background mapper has nothing queued (True at once without one).

        Work that waits on a release fence counts as done once it was retried after this call.
        """
        return self._m.wait_mapper(timeout)

    def stats(self) -> Dict[str, Union[int, float, None]]:
        """Counters and gauges.

        Gauges: ``chunks_physical`` (distinct chunks mapped), ``chunks_mapped`` (mappings; a shared
        chunk counts once per slot), ``chunks_shared``, ``chunks_active`` / ``chunks_released``
        (mappings in live / released slots), ``chunks_reclaimable`` (kept by released slots),
        ``chunks_surplus`` (live sequences' chunks past their reserved length), ``chunks_free``
        (:meth:`num_free_chunks`), ``chunks_budget`` (None without a budget),
        ``pool_cached_chunks``, ``slots_active|released|free``, ``tokens_reserved`` (sum over live
        sequences), ``tokens_mapped`` (physical bytes mapped / row), ``utilisation`` (their
        ratio; above 1 when forks share chunks), ``fences_pending`` (slots behind a release fence),
        ``suspended`` (1 between :meth:`suspend` and :meth:`resume`) and ``suspended_host_bytes``
        (host memory the suspended bytes take; 0 after a discard or when not suspended).

        Counters: ``maps`` (chunks mapped, one driver map each) = ``maps_background`` +
        ``maps_sync`` + ``maps_shared`` (fork prefixes); ``unmaps``; ``reclaimed_released`` /
        ``reclaimed_lookahead``; ``moved`` (a slot's own chunks remapped from past its need into a
        hole below it); ``trimmed`` (surplus chunks the mapper unmapped from live sequences into
        the pool); ``sync_waits`` (reserve calls that mapped synchronously) and ``wait_ns`` (their
        time, lock waits included); ``fence_waits`` (engine calls that waited, unlocked, for a
        fence), ``fences_recorded``; ``mapper_passes``, ``mapper_wakeups`` (requests
        that woke it: one per reserve_batch at most), ``mapper_busy_ns``, ``mapper_errors``;
        ``forks``, ``fork_tail_bytes``, ``releases``, ``swaps_out|in``, ``bytes_swapped_out|in``,
        ``batches`` (locked reserve_batch calls) and ``lengths_waits``.
        """
        return self._m.stats()

    def check_invariants(self) -> None:
        """Asserts every internal invariant (tables vs. range, refcounts, slot states, budget).

        For tests and debugging; raises AssertionError naming the first broken one.
        """
        broken = self._m.check_invariants()
        if broken:
            raise AssertionError(broken)

    def _raise_mapper_error(self) -> None:
        kind, msg = self._m.take_mapper_error()
        cause = _ERRORS.get(kind, RuntimeError)(msg)
        raise GlakeError(f"KVCache: the background mapper failed: {kind}: {msg}") from cause

    # ---- suspension ------------------------------------------------------------------------------

    def suspend(self, discard: bool = False, engine=None) -> None:
        """Gives the cache's device memory back to the driver; every address (every view) stays reserved.

        Waits for the pending release fences and synchronises the device, copies every physical chunk
        a live sequence maps to host memory (a fork's shared prefix chunk once; consecutive chunks in
        one copy), then unmaps everything and releases every chunk, the pool's cached ones too.
        Released slots' kept chunks are dropped, not copied (the slots become free). Nothing is
        unmapped before every copy succeeded: a failure leaves the cache as it was.

        While suspended, the views must not be touched (nothing is backed: an illegal address, SIGSEGV
        on the host backend), and every call that needs backing raises :class:`GlakeError` ("the KV
        cache is suspended ... call resume() first"): ``reserve``, ``reserve_batch``, ``prefetch``,
        ``fork``, ``write``/``check_writable``, ``swap_out``, ``swap_in``. ``can_reserve`` is False.
        What works: ``stats``, ``capacity`` (0: nothing is backed), ``reserved`` and :attr:`lengths`
        (sequences keep their lengths), ``chunk_ids`` (empty lists), ``allocate`` (a slot with nothing
        mapped), ``release`` (the sequence's places are forgotten: ``resume`` does not map them
        again), ``trim``, ``close``. The background mapper stays alive but maps nothing.

        Parameters
        ----------
        discard
            Copy nothing: after :meth:`resume` every sequence has its chunks at the same places
            (shared prefixes shared again) and keeps its length, but the contents are undefined.
        engine
            A multipath engine for the copies (``glake.multipath.engine(backend, device)``, or its
            ``.handle``), as :func:`glake.suspend` passes; None = the driver's memcpy.

        Raises
        ------
        InvalidArgumentError
            Already suspended, or the cache is closed.
        OutOfMemoryError
            No host memory for the copy; nothing changed.
        """
        self._m.suspend(bool(discard), _engine_handle(engine))

    def resume(self, engine=None) -> None:
        """Takes the memory again: every saved chunk is created first, then mapped at every place it had
        (a fork prefix: one chunk mapped in both slots again) and its bytes copied back (none after
        ``suspend(discard=True)``: the contents are then undefined). A no-op when not suspended.

        Raises
        ------
        OutOfMemoryError
            The device (or the budget) cannot give the chunks: nothing is kept, the cache stays
            suspended and ``resume()`` can be called again.
        """
        self._m.resume(_engine_handle(engine))

    @property
    def suspended(self) -> bool:
        """True between :meth:`suspend` and a successful :meth:`resume`."""
        return self._m.suspended

    # ---- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the mapper, unmaps everything, frees the addresses and the pool's chunks. Idempotent.

        Tensors from :meth:`k_cache`/:meth:`v_cache` must not be used afterwards.
        """
        if self._closed:
            return
        unregister(self._stats_key)
        from glake import suspension

        suspension.unregister(self)
        if self._on_cuda:
            torch.cuda.synchronize(self.device)
        self._closed = True
        self._k = self._v = []
        del self._bytes
        self._m.close()

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<glake.kvcache.KVCache closed>"
        st = self.stats()
        return (f"<glake.kvcache.KVCache {self.backend}:{self.device_index} {self.dtype} {self.layout.describe()}; "
                f"{st['slots_active']} live, {st['chunks_physical']} chunks>")
