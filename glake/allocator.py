"""The stitched caching allocator (GMLake's policy) as a Python object.

``glake.Allocator`` manages device memory (or host memory on the host backend) through glake's
VMM core: small requests (<= ``small_size``) are packed into 2 MiB chunks at 512 B rounding; large
ones are rounded to 2 MiB and served best-fit from cached blocks (their segments are made of
physical chunks of up to ``chunk_bytes``); when no single free block is big enough, the whole free
chunks of several blocks are **stitched** into one new virtual range instead of allocating more
memory. The same policy backs ``glake.torch`` and ``glake.cupy``.

Configuration keys (``GLAKE_ALLOC_CONF="key:value,..."`` or keyword arguments):

=================== ========= ===============================================================
key                 default   meaning
=================== ========= ===============================================================
stitch              true      stitch free chunks when no single free block fits
stitch_min_bytes    4MB       requests smaller than this are never stitched
stitch_va_limit     device    bound on the VA of cached stitched ranges (LRU-evicted past it)
limit_bytes         0 (none)  cap on reserved (physical) bytes
memory_fraction     0 (none)  cap as a fraction of device memory (the lower cap wins)
small_size          1MB       requests up to this size use the small pool
chunk_bytes         32MB      largest physical chunk of a large segment (a stitch maps whole chunks)
release_on_oom      true      on failure, free cached memory and retry before raising
=================== ========= ===============================================================
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from glake import _C
from glake.stats.sources import register_allocator
from glake.units import conf_text, conf_texts


def conf_string(conf: Dict[str, Any]) -> str:
    """``{"stitch": False, "limit_bytes": "8GB"}`` -> ``"stitch:false,limit_bytes:8GB"``."""
    return ",".join(f"{key}:{conf_text(value)}" for key, value in conf.items())


class Allocator:
    """A private stitched caching allocator for one device.

    It publishes itself to ``glake.stats`` (``glake ps``, ``glake stats``, ``glake map``) while it
    lives, under the pool name :attr:`stats_name`.

    Parameters
    ----------
    device : int
        Device ordinal.
    backend : str, optional
        ``"cuda"`` or ``"host"``; default ``$GLAKE_BACKEND`` or auto-detection.
    name : str, optional
        Pool name in the stats (default ``"<backend>:<device>/<n>"``, n a serial number).
    **conf
        Configuration keys (see the module docstring), applied over ``$GLAKE_ALLOC_CONF``. Sizes
        may be ints or strings (``limit_bytes="8GB"``).

    Raises
    ------
    InvalidArgumentError
        An unknown key or a bad value; the message names the key and whether it came from a
        keyword argument or ``GLAKE_ALLOC_CONF``.
    """

    def __init__(self, device: int = 0, backend: Optional[str] = None, name: Optional[str] = None,
                 **conf: Any) -> None:
        self._impl = _C.Allocator(device, backend, _C.alloc_config(conf_texts(conf)))
        self.stats_name = register_allocator(self, name)

    @classmethod
    def _wrap(cls, impl: "_C.Allocator") -> "Allocator":
        obj = cls.__new__(cls)
        obj._impl = impl
        obj.stats_name = ""  # a process-wide allocator: glake.stats finds those itself
        return obj

    def malloc(self, size: int, stream: int = 0) -> int:
        """Allocate ``size`` bytes for use on ``stream``; return the address.

        Raises
        ------
        OutOfMemoryError
            With the requested, allocated, reserved, device-free and limit figures and a hint.
        InvalidArgumentError
            ``size`` is not positive.
        """
        return self._impl.malloc(size, stream)

    def free(self, ptr: int) -> None:
        """Free the allocation at ``ptr`` (its base address); unknown, interior or double frees raise."""
        self._impl.free(ptr)

    def record_stream(self, ptr: int, stream: int) -> None:
        """Mark an allocation as used on ``stream`` too (reused only after that stream's work)."""
        self._impl.record_stream(ptr, stream)

    def empty_cache(self) -> None:
        """Release cached memory: idle stitched ranges and fully free segments."""
        self._impl.empty_cache()

    def suspend(self, discard: Iterable[int] = ()) -> None:
        """Give this allocator's device memory back, keeping every address valid.

        Waits for the device, drops the free cache, copies the physical chunks that hold live data to
        host memory (through the device's :func:`glake.multipath.engine`) and releases every chunk; the virtual ranges stay reserved, so pointers (tensors,
        CUDA graphs) stay valid for :meth:`resume`. Until then :meth:`malloc` raises ``GlakeError``;
        ``free``, ``stats`` and ``snapshot`` work (``stats()["suspended_host_bytes"]`` is the copy's size).
        ``discard``: base addresses of allocations whose contents need not survive; a chunk holding
        only those is not copied, and their bytes are undefined after :meth:`resume`.

        Raises
        ------
        InvalidArgumentError
            Already suspended, a private pool is being allocated to (a graph may be capturing), or
            ``discard`` names an address that is not a live allocation's base.
        """
        from glake import multipath

        self._impl.suspend(multipath.engine(self.backend, self.device).handle, sorted(int(p) for p in discard))

    def prepare_suspend(self) -> int:
        """Make the next :meth:`suspend`'s host memory ready now, while awake (see :func:`glake.prepare_suspend`).

        Returns the bytes made ready (0 when the kept buffers already cover the live data).
        """
        return self._impl.prepare_suspend()

    def drop_host_reserve(self) -> None:
        """Give back the host memory this allocator keeps for its next suspend (prepared or kept)."""
        self._impl.drop_host_reserve()

    def resume(self) -> None:
        """Take the device memory again at the same addresses and copy the data back (no-op if not suspended).

        Raises
        ------
        OutOfMemoryError
            The device cannot give the memory back now; nothing changed: still suspended, retry later.
        """
        from glake import multipath

        self._impl.resume(multipath.engine(self.backend, self.device).handle)

    @property
    def suspended(self) -> bool:
        """True between :meth:`suspend` and :meth:`resume`."""
        return self._impl.suspended

    def set_memory_fraction(self, fraction: float) -> None:
        """Cap reserved memory at ``fraction`` of the device (0 removes the cap)."""
        self._impl.set_memory_fraction(fraction)

    def stats(self) -> Dict[str, int]:
        """Counters: torch's key names (``allocated_bytes.all.current``, ...) plus glake's."""
        return self._impl.stats()

    def reset_peak_stats(self) -> None:
        """Set every peak to its current value."""
        self._impl.reset_peak_stats()

    def snapshot(self) -> List[Dict[str, Any]]:
        """Segments and stitched ranges: ``{kind, address, size, stitched, active, blocks: [...]}``; each
        block has ``address, size, requested, state, stream, lent_to`` and ``pool`` (``(first, second)``
        of its private pool, or None)."""
        return self._impl.snapshot()

    def allocation_of(self, ptr: int) -> Tuple[int, int]:
        """``(base, requested_bytes)`` of the live allocation containing ``ptr``, or ``(0, 0)``."""
        return self._impl.allocation_of(ptr)

    # ---- private pools (torch's MempoolId_t semantics; CUDA graph pools are pools (graph, 0)) ----

    def create_or_incref_pool(self, pool: Tuple[int, int]) -> None:
        """Create private pool ``pool`` (a nonzero ``(first, second)`` id) with use count 1, or add 1."""
        self._impl.create_or_incref_pool(*pool)

    def pool_use_count(self, pool: Tuple[int, int]) -> int:
        """The use count of ``pool`` (0 when unknown)."""
        return self._impl.pool_use_count(*pool)

    def begin_allocate_to_pool(self, pool: Tuple[int, int], streams: List[int]) -> None:
        """Route allocations on ``streams`` to ``pool`` (and add 1 to its use count) until
        :meth:`end_allocate_to_pool`. Memory the pool's allocations free stays with the pool and is
        reused only by its later allocations, until :meth:`release_pool` brings the count to 0.

        Raises
        ------
        InvalidArgumentError
            Already allocating to ``pool``.
        """
        self._impl.begin_allocate_to_pool(pool[0], pool[1], list(streams))

    def end_allocate_to_pool(self, pool: Tuple[int, int]) -> None:
        """Stop routing allocations to ``pool``; its memory stays with it."""
        self._impl.end_allocate_to_pool(*pool)

    def release_pool(self, pool: Tuple[int, int]) -> None:
        """Subtract 1 from the use count of ``pool``; at 0 its free memory returns to the cache
        (after a device synchronisation; while any pool is allocated to, at the next
        release or :meth:`empty_cache`) and its live blocks return when freed."""
        self._impl.release_pool(*pool)

    def pool_of(self, ptr: int) -> Optional[Tuple[int, int]]:
        """The private pool of the live allocation containing ``ptr``, or None."""
        return self._impl.pool_of(ptr)

    @property
    def limit(self) -> int:
        """The cap on reserved bytes in force (0 = none)."""
        return self._impl.limit

    @property
    def device(self) -> int:
        return self._impl.device

    @property
    def backend(self) -> str:
        return self._impl.backend

    @property
    def config(self) -> Dict[str, str]:
        """The configuration in force, as strings."""
        return self._impl.config


__all__ = ["Allocator", "conf_string"]
