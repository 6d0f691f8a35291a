"""torch's own memory API under glake's cpp frontend, one scenario per fresh process.

    python tests/gmlake/torch_api_scripts.py NAME [glake|native]

Each scenario prints "NAME ok" at the end; run by tests/gmlake/test_torch_api_gpu.py. With
``native`` the same scenario runs on torch's own allocator (the reference behaviour).
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
import tempfile

MODE = sys.argv[2] if len(sys.argv) > 2 else "glake"
if MODE == "glake":
    import glake.torch

    glake.torch.install(frontend="cpp")

import torch  # noqa: E402

MiB = 1 << 20


def memory_api() -> None:
    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    allocated = torch.cuda.memory_allocated()
    assert allocated >= 256 * MiB, allocated
    if MODE == "glake":
        assert allocated == glake.torch.memory_allocated()
        assert torch.cuda.memory_reserved() == glake.torch.memory_reserved()
    st = torch.cuda.memory_stats()
    for key in ("allocated_bytes.all.current", "allocated_bytes.large_pool.peak", "reserved_bytes.all.current",
                "active_bytes.all.current", "requested_bytes.all.current", "segment.all.current",
                "allocation.all.current", "allocation.all.allocated", "num_alloc_retries", "num_ooms",
                "num_device_alloc"):
        assert key in st, key
    assert st["requested_bytes.all.current"] >= 256 * MiB
    assert torch.cuda.max_memory_allocated() >= allocated
    del x
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
    torch.cuda.reset_accumulated_memory_stats()
    y = torch.empty(1000, device="cuda")
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == 1, torch.cuda.memory_stats()["allocation.all.allocated"]
    summary = torch.cuda.memory_summary()
    assert "Allocated memory" in summary and "GPU reserved memory" in summary, summary
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "memory_allocated"):
        assert accel.memory_allocated() == torch.cuda.memory_allocated() > 0, (accel.memory_allocated(), torch.cuda.memory_allocated())
        assert accel.memory_stats()["allocation.all.allocated"] == 1
        assert accel.max_memory_allocated() >= accel.memory_allocated()
    torch.cuda.set_per_process_memory_fraction(0.5)
    assert abs(torch.cuda.get_per_process_memory_fraction() - 0.5) < 1e-9
    del y
    print("memory_api ok")


def snapshot() -> None:
    torch.cuda.memory._record_memory_history(max_entries=10000)
    xs = [torch.randn(MiB, device="cuda") for _ in range(4)]
    del xs[1]
    big = [torch.empty(64 * MiB, dtype=torch.uint8, device="cuda") for _ in range(4)]
    del big[0], big[1]  # two free 64 MiB pieces: glake stitches them for a 128 MiB request
    stitched = torch.empty(128 * MiB, dtype=torch.uint8, device="cuda")
    snap = torch.cuda.memory._snapshot()
    blocks = [b for seg in snap["segments"] for b in seg["blocks"]]
    assert any(b["state"] == "active_allocated" for b in blocks)
    for seg in snap["segments"]:  # blocks tile their segment
        assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"], seg
    traces = snap["device_traces"][torch.cuda.current_device()]
    actions = {t["action"] for t in traces}
    assert {"alloc", "free_completed"} <= actions, actions
    allocs = [t for t in traces if t["action"] == "alloc"]
    assert any(t["addr"] == stitched.data_ptr() for t in allocs)
    assert any(f["filename"].endswith("torch_api_scripts.py") for t in allocs for f in t["frames"]), "no Python stacks"
    if MODE == "glake":
        assert glake.torch.memory_stats()["num_stitches"] >= 1
        assert any(seg["is_expandable"] and seg["address"] == stitched.data_ptr() for seg in snap["segments"])
    path = os.path.join(tempfile.mkdtemp(), "snap.pickle")
    torch.cuda.memory._dump_snapshot(path)
    with open(path, "rb") as f:
        dumped = pickle.load(f)
    from torch.cuda import _memory_viz

    html = _memory_viz.trace_plot(dumped)
    assert "<html" in html.lower() or "script" in html.lower()
    seg_html = _memory_viz.segment_plot(dumped)
    assert len(seg_html) > 100
    assert torch.cuda.memory_snapshot(), "memory_snapshot() is empty"
    torch.cuda.memory._record_memory_history(enabled=None)
    print("snapshot ok")


def oom() -> None:
    seen = []
    torch._C._cuda_attach_out_of_memory_observer(lambda *args: seen.append(args))
    try:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
    except torch.cuda.OutOfMemoryError as e:
        msg = str(e)
        assert msg.startswith("CUDA out of memory. Tried to allocate"), msg
        assert "GPU 0 has a total capacity of" in msg, msg
        if MODE == "glake":
            assert "glake: out of memory" in msg, msg
        print("oom message:", msg[:400].replace("\n", " | "))
    else:
        raise AssertionError("no OOM")
    assert seen, "the OOM observer was not called"
    x = torch.ones(1000, device="cuda")
    assert float(x.sum()) == 1000.0
    assert torch.cuda.memory_stats()["num_ooms"] >= 1
    print("oom ok")


def _step(x: torch.Tensor) -> torch.Tensor:
    for _ in range(8):  # each layer makes a 64 MiB tensor and drops the previous one
        x = (x * 1.01).relu()
    return x


def _capture(g, static, pool=None):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    with torch.cuda.graph(g, pool=pool):
        out = _step(static)
    return out, torch.cuda.memory_reserved() - before


def graphs() -> None:
    static = torch.randn(16 * MiB, device="cuda")  # 64 MiB
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(static)
    torch.cuda.current_stream().wait_stream(side)
    g1 = torch.cuda.CUDAGraph()
    out1, grew1 = _capture(g1, static)
    # 8 layers of 64 MiB: with reuse inside the capture only ~2 are live at once.
    assert grew1 <= 4 * 64 * MiB, f"the capture held {grew1 / MiB:.0f} MiB: freed memory was not reused"
    g2 = torch.cuda.CUDAGraph()
    static2 = out1
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    with torch.cuda.graph(g2, pool=g1.pool()):
        out2 = _step(static2)
    grew2 = torch.cuda.memory_reserved() - before
    assert grew2 <= 2 * 64 * MiB, f"the second graph on the shared pool added {grew2 / MiB:.0f} MiB"
    for _ in range(3):
        x = torch.randn(16 * MiB, device="cuda")
        static.copy_(x)
        g1.replay()
        g2.replay()
        torch.cuda.synchronize()
        assert torch.allclose(out2, _step(_step(x)), rtol=1e-5, atol=1e-5), "replay differs from eager"
    print(f"graph held MiB: first {grew1 / MiB:.0f}, second on the same pool {grew2 / MiB:.0f}")
    del out1, out2, g1, g2
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    print("graphs ok")


def graphed_callables() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    for _ in range(3):  # one backward per iteration, compared each time (graphed grads live in static buffers)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        inp = torch.randn(64, 256, device="cuda")
        graphed(inp).pow(2).sum().backward()
        ref(inp).pow(2).sum().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-3)
    print("graphed_callables ok")


def mempool() -> None:
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        x = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    ptr = x.data_ptr()
    assert pool.use_count() >= 1
    del x
    y = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")  # outside the pool: never the pool's block
    assert y.data_ptr() != ptr
    with torch.cuda.use_mem_pool(pool):
        z = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    assert z.data_ptr() == ptr, "the pool did not reuse its own free memory"
    del z, y, pool
    gc.collect()
    torch.cuda.empty_cache()
    print("mempool ok")


def trace_callbacks() -> None:
    import torch.cuda._gpu_trace as gpu_trace

    allocated, freed = [], []
    gpu_trace.register_callback_for_memory_allocation(allocated.append)
    gpu_trace.register_callback_for_memory_deallocation(freed.append)
    torch._C._activate_gpu_trace()
    x = torch.empty(1000, device="cuda")
    ptr = x.data_ptr()
    assert ptr in allocated, (ptr, allocated)
    del x
    assert ptr in freed, (ptr, freed)
    print("trace_callbacks ok")


def cudnn_benchmark() -> None:
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3)).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    for step in range(5):
        x = torch.randn(16 + 8 * step, 3, 64, 64, device="cuda")
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    print("cudnn_benchmark ok")


def ipc() -> None:
    x = torch.ones(1024, device="cuda")
    try:
        x.untyped_storage()._share_cuda_()
    except RuntimeError as e:
        if MODE == "glake":
            assert "glake: CUDA IPC" in str(e), e
            print("ipc refused:", str(e)[:160])
        else:
            raise
    else:
        assert MODE == "native", "glake memory was exported through CUDA IPC"
    print("ipc ok")


def cupy_stream() -> None:
    import cupy

    import glake.cupy

    glake.cupy.install()
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        a = cupy.arange(1 << 22, dtype=cupy.float32)
    blocks = [b for seg in glake.torch.memory_snapshot() for b in seg["blocks"] if b["address"] == a.data.ptr]
    assert blocks and blocks[0]["stream"] == s.ptr, (blocks, s.ptr)
    b = cupy.ones(16, dtype=cupy.float32)  # the default stream again
    del a, b
    print("cupy_stream ok")


def suspend_resume(prepare: bool = False) -> None:
    """glake only: a training step, a captured graph; suspend gives the memory to the driver; after
    resume the same tensors, the optimizer and the graph replay give what they gave before. With
    ``prepare``, glake.prepare_suspend() first: the suspend and the resume go through its page-locked
    host buffers (DMA without staging), which stay until released."""
    import glake
    from glake import _C

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(256, 1024, device="cuda")

    def step() -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()
    static = torch.randn(16 * MiB, device="cuda")
    g = torch.cuda.CUDAGraph()
    out, _ = _capture(g, static)
    g.replay()
    want_graph = out.clone()
    state = [p.detach().clone() for p in model.parameters()]
    opt_state = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()} for k, v in opt.state.items()}
    want_loss = step()
    want_params = [p.detach().clone() for p in model.parameters()]  # after AdamW's update
    with torch.no_grad():  # back to the state before that step, to run it again after resume
        for p, s in zip(model.parameters(), state):
            p.copy_(s)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    alloc = _C.gmlake_global(torch.cuda.current_device())
    made = glake.prepare_suspend() if prepare else 0
    assert glake.suspend() == [torch.cuda.current_device()]
    st = alloc.stats()
    if prepare:
        assert made > 0 and st["suspended_reused_bytes"] == st["suspended_host_bytes"] == made, (made, st)
    free_suspended, _ = torch.cuda.mem_get_info()
    assert free_suspended - free_before >= 0.9 * reserved, (free_before, free_suspended, reserved)
    try:
        torch.empty(1, device="cuda")
        raise AssertionError("allocated while suspended")
    except RuntimeError as e:
        assert "suspended" in str(e), e
    glake.resume()
    for k, v in opt_state.items():
        opt.state[k].update(v)
    got_loss = step()
    assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=0), (got_loss, want_loss)
    for p, w in zip(model.parameters(), want_params):  # weights and AdamW's moments survived
        assert torch.allclose(p, w, rtol=1e-6, atol=1e-7)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want_graph), "the graph replays differently after resume"
    if prepare:
        assert alloc.stats()["kept_host_bytes"] == made, "the prepared buffers stay for the next suspend"
        glake.release_suspend_host()
        assert alloc.stats()["kept_host_bytes"] == 0
    print(f"suspended {reserved / MiB:.0f} MiB reserved: device free {free_before / MiB:.0f} -> "
          f"{free_suspended / MiB:.0f} MiB")
    print("suspend_resume_prepared ok" if prepare else "suspend_resume ok")


def suspend_resume_prepared() -> None:
    suspend_resume(prepare=True)


SCENARIOS = {f.__name__: f for f in (memory_api, snapshot, oom, graphs, graphed_callables, mempool, trace_callbacks,
                                     cudnn_benchmark, ipc, cupy_stream, suspend_resume,
                                     suspend_resume_prepared)}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
