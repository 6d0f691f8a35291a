"""What dedup computes about chunk contents: a digest of each chunk (where the data is: torch kernels on
the GPU for cuda, BLAKE2b on the host) and a byte-for-byte comparison of two chunks.

The digest only nominates candidates; two chunks are shared only after :func:`equal_chunks` said their bytes
are the same. ``GLAKE_DEDUP_TEST_COLLIDE=1`` makes every digest the same (a test hook: a forced
collision must never lead to sharing unequal bytes).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Sequence, Tuple

COLLIDE_ENV = "GLAKE_DEDUP_TEST_COLLIDE"
_BATCH_CHUNKS = 16  # cuda: chunks hashed per kernel launch (a 2 MiB int64 temporary each)
_weights: Dict[Any, Any] = {}


def _lane_weights(torch, n: int, device) -> Any:
    """Two fixed rows of odd 64-bit multipliers, the same in every process (seeded)."""
    key = (n, str(device))
    if key not in _weights:
        g = torch.Generator().manual_seed(0x6C616B65)  # "lake"
        w = torch.randint(-(1 << 62), 1 << 62, (2, n), generator=g, dtype=torch.int64) * 2 + 1
        _weights[key] = w.to(device)
    return _weights[key]


def digests(view: Any, offsets: Sequence[int], chunk: int) -> List[str]:
    """Hex digests of the `chunk`-byte pieces at `offsets` of `view` (a uint8 tensor over a whole range:
    a cuda tensor is hashed on its GPU, a CPU one with BLAKE2b)."""
    if os.environ.get(COLLIDE_ENV) == "1":
        return ["collide"] * len(offsets)
    if view.device.type != "cuda":
        data = view.numpy()
        return [hashlib.blake2b(data[o:o + chunk], digest_size=16).hexdigest() for o in offsets]
    import torch

    words = chunk // 8
    w = _lane_weights(torch, words, view.device)
    out: List[str] = []
    for at in range(0, len(offsets), _BATCH_CHUNKS):
        batch = offsets[at:at + _BATCH_CHUNKS]
        x = torch.stack([view[o:o + chunk].view(torch.int64) for o in batch])  # (b, words)
        lanes = torch.stack([(x * w[0]).sum(1), (x * w[1]).sum(1)], 1)  # int64 sums wrap: mod 2**64
        out += ["%016x%016x" % (a & (2**64 - 1), b & (2**64 - 1)) for a, b in lanes.tolist()]
    return out


def runs(idx: Sequence[int]) -> List[Tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in ascending `idx`."""
    out: List[Tuple[int, int]] = []
    for i in idx:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def equal_chunks(view: Any, idx: Sequence[int], theirs: Any, chunk: int) -> List[bool]:
    """Whether chunk idx[n] of `view` (ascending idx) holds the same bytes as the n-th chunk of `theirs`
    (uint8 tensors of one device), for every n: on cuda one comparison per run of adjacent chunks, in
    place, and one wait for all the answers."""
    if view.device.type != "cuda":
        a, b = view.numpy(), theirs.numpy()
        return [bool((a[i * chunk:(i + 1) * chunk] == b[n * chunk:(n + 1) * chunk]).all()) for n, i in enumerate(idx)]
    import torch

    differs, at = [], 0
    for first, count in runs(idx):
        mine = view[first * chunk:(first + count) * chunk].view(count, chunk).view(torch.int64)
        other = theirs[at * chunk:(at + count) * chunk].view(count, chunk).view(torch.int64)
        differs.append((mine != other).any(1))
        at += count
    return [not d for d in torch.cat(differs).tolist()]
