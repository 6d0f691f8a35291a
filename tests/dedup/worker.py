"""One dedup process for the tests, driven by lines on stdin; each answers one JSON line on stdout.

    fill SEED [FLIP_CHUNK]   a new arena of CHUNKS chunks with bytes drawn from SEED (one byte of
                             chunk FLIP_CHUNK changed); answers {}
    share                    arena.share(); answers the arena's stats
    check                    answers {"intact": the arena still holds what fill wrote}
    write                    writes to the arena's first byte (shared: the process dies of SIGSEGV)
    module SEED              shares a seeded torch module; answers stats and whether forward is unchanged
    stats                    answers glake.dedup.stats()
"""

import json
import os
import sys

import numpy as np
import torch

import glake.dedup

CHUNKS = int(os.environ.get("DEDUP_TEST_CHUNKS", "6"))
BACKEND = os.environ.get("DEDUP_TEST_BACKEND", "host")  # cuda: arenas and modules on the GPU
DEVICE = "cuda" if BACKEND == "cuda" else "cpu"


def expected(seed: int, flip: int, size: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    if flip >= 0:
        data[flip * (size // CHUNKS) + 12345] ^= 0xFF
    return data


def main() -> None:
    arena, want, keep = None, None, []
    for line in sys.stdin:
        cmd, *args = line.split()
        out = {}
        if cmd == "fill":
            keep.append(arena)  # earlier arenas stay in use
            arena = glake.dedup.Arena(CHUNKS * (2 << 20), backend=BACKEND)
            want = expected(int(args[0]), int(args[1]) if len(args) > 1 else -1, arena.size)
            arena.tensor().copy_(torch.from_numpy(want))
        elif cmd == "share":
            arena.share()
            out = arena.stats()
        elif cmd == "check":
            out = {"intact": bool(np.array_equal(arena.tensor().cpu().numpy(), want))}
        elif cmd == "write":
            arena.tensor()[0] = 1
            if BACKEND == "cuda":
                torch.cuda.synchronize()  # the kernel's write faults: the context is lost
        elif cmd == "module":
            torch.manual_seed(int(args[0]))
            m = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
            m.requires_grad_(False).to(DEVICE)
            x = torch.randn(4, 512, device=DEVICE)
            before = m(x)
            shared = glake.dedup.share(m)
            keep.append(shared)
            out = {**shared.stats(), "same_output": bool(torch.equal(m(x), before))}
        elif cmd == "stats":
            out = glake.dedup.stats()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
