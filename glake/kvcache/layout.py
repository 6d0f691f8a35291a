"""KVLayout: where every byte of the KV cache lives in the one reserved address range.

The range is ``max_seqs`` slots back to back. A slot holds one sequence's tokens in order; a token's
*row* holds K and V of every layer::

    [slot][token][layer][k|v][kv_head][head_dim]

so for layer ``l`` the K cache of the whole batch is a plain strided tensor
``[max_seqs, max_seq_len, num_kv_heads, head_dim]`` (no block table, fixed addresses).

Physical memory comes in chunks of ``chunk_bytes`` (2 MiB). Chunk ``i`` of a slot backs the slot's
bytes ``[i * chunk_bytes, (i + 1) * chunk_bytes)``. Rows are never padded: when a row does not divide
the chunk size, a row may straddle two chunks (the addresses are contiguous, so nothing but the
arithmetic notices). Tokens ``[0, n)`` are backed once the slot's first ``chunks_for(n)`` chunks are
mapped. The only rounding is the slot stride, ``max_seq_len * row`` rounded up to a whole chunk, which
costs virtual addresses, never physical memory.

Everything here is integer arithmetic; nothing touches memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple, Union

from glake.errors import InvalidArgumentError
from glake.units import fmt_bytes


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name}={value!r} must be an int")
    if not isinstance(value, int):
        try:
            import operator

            value = operator.index(value)  # numpy integers
        except TypeError:
            raise InvalidArgumentError(f"{name}={value!r} must be an int") from None
    if value <= 0:
        raise InvalidArgumentError(f"{name}={value} must be positive")
    return int(value)


@dataclass(frozen=True)
class KVLayout:
    """The byte layout of one model's KV cache.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim
        The model's shape.
    itemsize
        Bytes per element (2 for bf16/fp16, 4 for fp32).
    max_seqs
        Number of slots (sequences that can be live at once).
    max_seq_len
        Tokens per slot.
    chunk_bytes
        Physical chunk size (the VMM granularity, 2 MiB).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    itemsize: int
    max_seqs: int
    max_seq_len: int
    chunk_bytes: int
    row_bytes: int = field(init=False)
    slot_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "itemsize", "max_seqs", "max_seq_len", "chunk_bytes"):
            object.__setattr__(self, name, _positive_int(name, getattr(self, name)))
        row = self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize
        slot = -(-self.max_seq_len * row // self.chunk_bytes) * self.chunk_bytes
        object.__setattr__(self, "row_bytes", row)
        object.__setattr__(self, "slot_bytes", slot)

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes of virtual addresses reserved for all slots."""
        return self.max_seqs * self.slot_bytes

    @property
    def chunks_per_slot(self) -> int:
        """Chunks that back a whole slot."""
        return self.slot_bytes // self.chunk_bytes

    @property
    def tokens_per_chunk(self) -> Union[int, float]:
        """``chunk_bytes / row_bytes``: an int when the row divides the chunk, else a float (rows straddle)."""
        if self.chunk_bytes % self.row_bytes == 0:
            return self.chunk_bytes // self.row_bytes
        return self.chunk_bytes / self.row_bytes

    @property
    def row_divides_chunk(self) -> bool:
        """True when every chunk holds a whole number of rows (no row straddles two chunks)."""
        return self.chunk_bytes % self.row_bytes == 0

    @property
    def va_waste_bytes_per_slot(self) -> int:
        """Virtual (never physical) bytes per slot beyond ``max_seq_len`` rows, from rounding to a chunk."""
        return self.slot_bytes - self.max_seq_len * self.row_bytes

    # ---- token <-> chunk arithmetic ------------------------------------------------------------

    def chunks_for(self, tokens: int) -> int:
        """Chunks a slot needs mapped (from its start) to back tokens ``[0, tokens)``."""
        return -(-tokens * self.row_bytes // self.chunk_bytes)

    def tokens_backed(self, chunks: int) -> int:
        """Tokens ``[0, n)`` fully backed by a slot's first ``chunks`` chunks (at most ``max_seq_len``)."""
        return min(self.max_seq_len, chunks * self.chunk_bytes // self.row_bytes)

    def chunk_span(self, start: int, end: int) -> Tuple[int, int]:
        """Chunk indices ``[first, last)`` that hold any byte of tokens ``[start, end)`` of a slot."""
        if end <= start:
            return (0, 0)
        return (start * self.row_bytes // self.chunk_bytes, self.chunks_for(end))

    def full_chunks_of_prefix(self, prefix_len: int) -> int:
        """Chunks whose every byte belongs to tokens ``[0, prefix_len)``: the ones a fork can share."""
        return prefix_len * self.row_bytes // self.chunk_bytes

    def first_token_after_chunks(self, chunks: int) -> int:
        """The first token with no byte in a slot's first ``chunks`` chunks."""
        return -(-chunks * self.chunk_bytes // self.row_bytes)

    # ---- offsets ------------------------------------------------------------------------------

    def slot_offset(self, slot: int) -> int:
        """Byte offset of a slot in the range."""
        return slot * self.slot_bytes

    def chunk_offset(self, slot: int, index: int) -> int:
        """Byte offset in the range of chunk ``index`` of ``slot``."""
        return slot * self.slot_bytes + index * self.chunk_bytes

    def token_offset(self, slot: int, token: int) -> int:
        """Byte offset in the range of a token's row."""
        return slot * self.slot_bytes + token * self.row_bytes

    def kv_offset(self, layer: int, kv: int) -> int:
        """Byte offset inside a row of layer ``layer``'s K (kv=0) or V (kv=1) block."""
        return ((layer * 2 + kv) * self.num_kv_heads * self.head_dim) * self.itemsize

    # ---- strided views --------------------------------------------------------------------------

    @property
    def view_shape(self) -> Tuple[int, int, int, int]:
        """Shape of ``k_cache(l)`` / ``v_cache(l)``: ``(max_seqs, max_seq_len, num_kv_heads, head_dim)``."""
        return (self.max_seqs, self.max_seq_len, self.num_kv_heads, self.head_dim)

    @property
    def view_strides(self) -> Tuple[int, int, int, int]:
        """Strides of the views, in elements."""
        return (self.slot_bytes // self.itemsize, self.row_bytes // self.itemsize, self.head_dim, 1)

    def view_storage_offset(self, layer: int, kv: int) -> int:
        """Storage offset, in elements, of layer ``layer``'s K (kv=0) or V (kv=1) view."""
        return self.kv_offset(layer, kv) // self.itemsize

    def describe(self) -> str:
        """One line for messages and docs."""
        tpc = self.tokens_per_chunk
        tpc_s = str(tpc) if isinstance(tpc, int) else f"{tpc:.2f} (rows straddle chunks)"
        return (f"row {self.row_bytes} B ({self.num_layers} layers x 2 x {self.num_kv_heads} heads x {self.head_dim} x "
                f"{self.itemsize} B), {tpc_s} tokens per {fmt_bytes(self.chunk_bytes)} chunk, slot stride "
                f"{self.slot_bytes} B, {self.max_seqs} slots = {fmt_bytes(self.total_bytes)} of addresses")
