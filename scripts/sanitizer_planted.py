"""A planted error for `scripts/gpu-test.sh --sanitize`: a kernel writes past the end of a glake
allocation, into VA that nothing maps. compute-sanitizer's memcheck must report it."""

import glake.torch

glake.torch.install()
import torch  # noqa: E402

x = torch.empty(1024, device="cuda")  # one 4 KiB block at the start of a 2 MiB chunk
past_the_end = x.as_strided((3 << 20,), (1,))  # 12 MiB from x's start: beyond the mapped chunks
past_the_end.fill_(1.0)
torch.cuda.synchronize()
print("planted write done")
