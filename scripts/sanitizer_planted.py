"""A planted error for `scripts/gpu-test.sh --sanitize`: a kernel writes past the end of a glake
allocation, into VA that nothing maps. compute-sanitizer's memcheck must report it.

torch refuses views past a storage's end, so the write is a Triton kernel given the raw pointer."""

import glake.torch

glake.torch.install()
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def fill(p, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(p + offs, 1.0)  # no mask: every program writes, the buffer ends after the first


x = torch.empty(1024, device="cuda")  # one 4 KiB block at the start of a glake segment
fill[((64 << 20) // 4 // 1024,)](x, BLOCK=1024)  # 64 MiB from x's start: beyond its mapped chunks
torch.cuda.synchronize()
print("planted write done")
