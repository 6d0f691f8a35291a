"""PrefixCache: finished sequences kept in their KV slots, found again by the hashes of their token blocks.

A block is ``tokens_per_chunk`` tokens (one 2 MiB chunk of KV rows), so a match of k blocks is k
whole chunks that ``kv.fork(entry_slot, k * block)`` maps into the new sequence's slot without
copying anything. Block hashes are chained (block i's hash covers blocks 0..i), so one lookup per
block finds the longest cached prefix; the tokens are compared too (no trust in the hash alone).
Entries are evicted least recently used first, whenever the scheduler needs their slot or memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from glake.kvcache import KVCache


@dataclass
class CacheEntry:
    """A finished sequence's slot and the tokens whose K/V it holds (whole blocks only are looked up)."""

    slot: int
    tokens: List[int]
    hashes: List[int]


def block_hashes(tokens: List[int], block: int, n_blocks: int) -> List[int]:
    """Chained hashes of the first ``n_blocks`` blocks: ``h[i] = hash((h[i-1], block i's tokens))``."""
    out, h = [], 0
    for i in range(n_blocks):
        h = hash((h, tuple(tokens[i * block:(i + 1) * block])))
        out.append(h)
    return out


class PrefixCache:
    """Finished sequences' slots, kept for their prompt prefixes (see the module docstring).

    Parameters
    ----------
    kv
        The cache the slots belong to; the rows must divide the chunk (``tokens_per_chunk`` an int).
    """

    def __init__(self, kv: KVCache) -> None:
        tpc = kv.tokens_per_chunk
        if not isinstance(tpc, int):
            raise ValueError(f"prefix caching needs KV rows that divide the 2 MiB chunk ({tpc:.2f} tokens per chunk)")
        self.kv = kv
        self.block = tpc
        self.entries: "OrderedDict[int, CacheEntry]" = OrderedDict()  # slot -> entry, least recently used first
        self.by_hash: Dict[int, int] = {}  # chained block hash -> slot of an entry holding that prefix
        self.hits = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self.entries)

    def insert(self, slot: int, tokens: List[int], num_cached: int) -> bool:
        """Keeps ``slot`` (a finished sequence's) if it holds a whole block no entry has; else releases it.

        Returns whether it was kept. ``tokens[:num_cached]`` must have their K/V in the slot.
        """
        n = num_cached // self.block
        hashes = block_hashes(tokens, self.block, n)
        if not hashes or all(h in self.by_hash for h in hashes):
            self.kv.release(slot)
            return False
        self.entries[slot] = CacheEntry(slot, list(tokens[:n * self.block]), hashes)
        for h in hashes:
            self.by_hash[h] = slot
        return True

    def match(self, tokens: List[int], limit: int) -> Tuple[Optional[int], int]:
        """The entry slot holding the longest block-aligned prefix of ``tokens`` of at most ``limit`` tokens,
        and that prefix's length; ``(None, 0)`` without one."""
        best: Tuple[Optional[int], int] = (None, 0)
        for i, h in enumerate(block_hashes(tokens, self.block, min(limit, len(tokens)) // self.block)):
            slot = self.by_hash.get(h)
            if slot is None:
                break
            n = (i + 1) * self.block
            if self.entries[slot].tokens[:n] != tokens[:n]:
                break  # a hash collision
            best = (slot, n)
        return best

    def use(self, slot: int, prefix_len: int) -> None:
        """Records a hit on ``slot`` (it becomes the most recently used)."""
        self.entries.move_to_end(slot)
        self.hits += 1
        self.hit_tokens += prefix_len

    def evict(self, keep: Optional[int] = None) -> bool:
        """Releases the least recently used entry other than ``keep``; False when there is none."""
        for slot in self.entries:
            if slot != keep:
                e = self.entries.pop(slot)
                for h in e.hashes:
                    if self.by_hash.get(h) == slot:  # another entry may hold the same prefix: point there
                        other = next((o.slot for o in reversed(self.entries.values()) if h in o.hashes), None)
                        if other is None:
                            del self.by_hash[h]
                        else:
                            self.by_hash[h] = other
                self.kv.release(slot)
                return True
        return False

    def clear(self) -> None:
        """Releases every entry."""
        for slot in list(self.entries):
            self.kv.release(slot)
        self.entries.clear()
        self.by_hash.clear()
