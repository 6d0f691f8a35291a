"""Programs the GPU tests run in fresh processes (glake.torch.install() is per process, first thing).

    python tests/gmlake/gpu_scripts.py NAME [glake|native]
"""

from __future__ import annotations

import os
import sys

MODE = sys.argv[2] if len(sys.argv) > 2 else "glake"
if MODE == "glake" and sys.argv[1] != "run_cli":
    import glake.torch

    glake.torch.install(**({"limit_bytes": "4GB"} if sys.argv[1] == "oom" else {}))

import torch  # noqa: E402


def train() -> None:
    """A deterministic training loop with batch sizes that vary step to step; prints the losses."""
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for step in range(30):
        batch = int(torch.randint(64, 4096, (1,), generator=gen))
        x = torch.randn(batch, 512, generator=gen).cuda()
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"loss {step} {loss.item().hex()}")
    if MODE == "glake":
        st = glake.torch.memory_stats()
        assert st["allocation.all.allocated"] > 100, st
        assert st["reserved_bytes.all.peak"] >= st["allocated_bytes.all.peak"] > 0
        print(glake.torch.memory_summary())


def graph() -> None:
    """Capture a step after a warm-up, replay it on new inputs, compare with eager."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)).cuda()
    static_x = torch.randn(128, 256, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = model(static_x)
    # Eager tensors allocated after capture must not share memory with the graph's intermediates.
    bystanders = [torch.full((128, 1024), float(i), device="cuda") for i in range(8)]
    for _ in range(5):
        x = torch.randn(128, 256, device="cuda")
        static_x.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        assert torch.allclose(static_y, model(x), atol=1e-5), "replay differs from eager"
        for i, b in enumerate(bystanders):
            assert bool((b == float(i)).all()), "a replay overwrote an eager tensor"
    reserved = glake.torch.memory_reserved()
    del static_y
    g.reset()
    del g
    print("graph ok", reserved)


def streams() -> None:
    """A tensor used on a side stream, record_stream'ed and freed, is not reused too early."""
    side = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda")
    x = torch.full((64 << 20,), 3.0, device="cuda")  # 256 MiB
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(20):
            a = a @ a / 64  # keep the side stream busy
        y = x * 2
    x.record_stream(side)
    ptr = x.data_ptr()
    del x
    z = torch.full((64 << 20,), 7.0, device="cuda")  # must not land on x's memory while side runs
    side.synchronize()
    assert torch.all(y == 6.0), "x was overwritten before the side stream finished"
    assert torch.all(z == 7.0)
    print("reused at once:", z.data_ptr() == ptr)
    del z, y
    torch.cuda.synchronize()
    w = torch.empty(64 << 20, device="cuda")  # now the block may come back
    print("streams ok", w.data_ptr() == ptr, glake.torch.memory_stats()["num_cross_stream_reuses"])


def oom() -> None:
    """OOM under a 4 GB limit raises a readable error; the process continues after freeing."""
    keep = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(3)]
    try:
        torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    except RuntimeError as e:
        msg = str(e)
        assert "glake: out of memory" in msg and "limit 4.00 GiB" in msg and "Hint" in msg, msg
        print("oom message:", msg.splitlines()[0][:300])
    else:
        raise AssertionError("no OOM")
    keep.pop()
    y = torch.ones(1 << 30, dtype=torch.uint8, device="cuda")
    assert int(y[:: 1 << 12].sum()) == 1 << 18  # a strided sum: no 8 GB int64 temporary
    st = glake.torch.memory_stats()
    assert st["num_ooms"] >= 1 and st["reserved_bytes.all.current"] <= 4 << 30
    torch.cuda.set_per_process_memory_fraction(0.01)
    try:
        torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
        raise AssertionError("memory fraction not honoured")
    except RuntimeError as e:
        assert "glake: out of memory" in str(e)
    torch.cuda.set_per_process_memory_fraction(1.0)
    del keep, y
    before = glake.torch.memory_reserved()
    torch.cuda.empty_cache()
    assert glake.torch.memory_reserved() < before
    print("oom ok")


def cupy_interop() -> None:
    """CuPy and torch share glake's allocator; CuPy OOM raises."""
    import cupy

    import glake.cupy

    glake.cupy.install()
    before = glake.torch.memory_stats()["allocation.all.allocated"]
    a = cupy.arange(1 << 24, dtype=cupy.float32)
    t = torch.as_tensor(a, device="cuda")
    assert t.data_ptr() == a.data.ptr
    assert torch.equal(t, torch.arange(1 << 24, device="cuda", dtype=torch.float32))
    assert glake.torch.memory_stats()["allocation.all.allocated"] > before
    base, size = glake.torch.allocator().allocation_of(a.data.ptr)
    assert base == a.data.ptr and size == a.nbytes
    try:
        cupy.empty(1 << 50, dtype=cupy.uint8)
    except MemoryError as e:
        assert "glake: out of memory" in str(e), e
        print("cupy oom ok")
    print("cupy ok")


def run_cli() -> None:
    """Run under `glake run`: glake must already be torch's allocator."""
    import glake.torch

    x = torch.empty(8 << 20, device="cuda")
    assert glake.torch.is_installed()
    assert glake.torch.memory_allocated() >= x.numel() * 4
    print("run ok")


if __name__ == "__main__":
    {"train": train, "graph": graph, "streams": streams, "oom": oom, "cupy": cupy_interop, "run_cli": run_cli}[sys.argv[1]]()
