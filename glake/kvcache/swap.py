"""Swap: a sequence's KV bytes parked in host memory while its chunks serve other sequences.

``KVCache.swap_out(slot)`` copies the slot's rows ``[0, length)`` into a :class:`SwapHandle` (pinned
host memory on cuda, so the copy is a real asynchronous DMA) and frees the slot's chunks;
``KVCache.swap_in(handle)`` maps fresh chunks into a free slot and copies the bytes back. The copies
are plain ``Tensor.copy_(non_blocking=True)`` on torch's current stream (the multipath engine will
speed them up later). On cuda the copy out is waited for before the chunks are unmapped (an unmapped
source would be an illegal address); the copy in is ordered before later work on the same stream.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from glake.errors import InvalidArgumentError


class SwapHandle:
    """The host copy of one swapped-out sequence; pass it to :meth:`KVCache.swap_in` once.

    Attributes
    ----------
    length : int
        Tokens saved (the slot's reserved length at swap-out).
    nbytes : int
        Bytes saved (``length`` rows).
    slot : int
        The slot it was swapped out of (``swap_in`` may return another one).
    """

    __slots__ = ("length", "nbytes", "slot", "_buffer", "_owner", "_consumed")

    def __init__(self, length: int, nbytes: int, slot: int, buffer: torch.Tensor, owner: Any) -> None:
        self.length = length
        self.nbytes = nbytes
        self.slot = slot
        self._buffer: Optional[torch.Tensor] = buffer
        self._owner = owner  # identifies the KVCache it belongs to (a unique token object)
        self._consumed = False

    @property
    def consumed(self) -> bool:
        """True once swapped back in (or discarded)."""
        return self._consumed

    @property
    def buffer(self) -> torch.Tensor:
        """The host bytes (uint8, ``nbytes`` long); pinned when the cache is on cuda."""
        if self._buffer is None:
            raise InvalidArgumentError("this SwapHandle was already swapped in or discarded")
        return self._buffer

    def discard(self) -> None:
        """Drops the host copy without swapping it in (the sequence is abandoned)."""
        self._buffer = None
        self._consumed = True

    def __repr__(self) -> str:
        state = "consumed" if self._consumed else f"{self.nbytes} B on host"
        return f"<glake.kvcache.SwapHandle {self.length} tokens from slot {self.slot}, {state}>"


def host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """An uninitialised uint8 host tensor of ``nbytes`` (page-locked when ``pinned``)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def copy_out(src: torch.Tensor, dst: torch.Tensor, on_cuda: bool) -> None:
    """Copies device (or host-backend) bytes ``src`` into host ``dst`` and waits until they are there."""
    if on_cuda:
        dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
    else:
        dst.copy_(src)


def copy_in(src: torch.Tensor, dst: torch.Tensor, on_cuda: bool) -> None:
    """Copies host bytes ``src`` into the cache bytes ``dst``, ordered on the current stream.

    On cuda this returns before the copy finishes; torch's pinned-memory allocator keeps ``src``
    alive until it has, and later work on the same stream sees the bytes.
    """
    dst.copy_(src, non_blocking=on_cuda)
