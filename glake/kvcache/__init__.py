"""glake.kvcache: the vTensor KV-cache manager.

One reserved address range per model holds every sequence's KV rows back to back, so that
``k_cache(layer)`` / ``v_cache(layer)`` are plain strided torch tensors
``[max_seqs, max_seq_len, num_kv_heads, head_dim]`` at fixed addresses (no block table). Physical
2 MiB chunks are mapped into a sequence's slot as it grows, ahead of need by a background thread;
``fork`` shares a prefix's chunks between sequences without copying them; ``swap_out``/``swap_in``
park a sequence in host memory. Needs torch. See docs/kvcache.md.

>>> from glake.kvcache import KVCache
>>> with KVCache(32, 8, 128, "bfloat16", max_seqs=64, max_seq_len=4096, backend="host") as kv:
...     s = kv.allocate()
...     kv.reserve(s, 100)                      # tokens [0, 100) backed (7 chunks of 16 tokens)
...     _ = kv.k_cache(0)[s, 99].fill_(1.0)     # an ordinary strided tensor
...     kv.capacity(s) >= 100
True
"""

from glake.kvcache.attention import GatherIndex, attend, decode_attention, gather_index
from glake.kvcache.layout import KVLayout
from glake.kvcache.manager import KVCache
from glake.kvcache.swap import SwapHandle

__all__ = ["KVCache", "KVLayout", "SwapHandle", "decode_attention", "gather_index", "attend", "GatherIndex"]
