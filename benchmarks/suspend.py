"""Suspend and resume of glake's memory (GPU): time each way and device memory left, by size.

For each size, a fresh process installs glake.torch, fills that many bytes of tensors (1 GiB each,
random data), and times glake.suspend() and glake.resume() (device synchronised around each), reads
cudaMemGetInfo before, while suspended and after, checks one tensor's checksum across the pair, and
reads the driver's time in unmap/release (suspend) and create/map/set_access (resume).
Targets (issue 16): >= 40 GB/s each way, device memory left <= 0.1 GiB plus what glake does not manage
(the CUDA context, torch's kernels); first token after a server's wake <= 2x the time to copy its weights
back.

Fresh host memory is faulted in by GLAKE_SUSPEND_PREFAULT_THREADS threads (default 8) while the copy
fills it (csrc/core/host_copy.h, FaultAhead). ``--prefault-threads 0,8,12`` runs each size once per
value, each in a process of its own with that setting (0: the copy faults its pages in itself).

``--probe`` adds, per size, where suspend's time can go on this machine, each part measured alone in
the same process: the transparent-huge-page setting; faulting in fresh anonymous memory with 8
threads; multipath's device-to-pageable copy into memory already faulted in and into fresh memory;
allocating pinned memory and copying into it; and the device memory the driver takes for that much
page-locked host memory, by how it is page-locked (cudaHostRegister, cuMemHostAlloc, cuMemCreate on
the host through the virtual memory API), with each one's speeds.

``--keep-host`` adds, per size, two suspend/resume cycles with GLAKE_SUSPEND_KEEP_HOST=1 and shows the
second: its suspend copies into the host buffers the first resume kept (resident memory).

``--prepared`` adds, per size, a process that calls glake.prepare_suspend() first (timed apart): its
suspend copies into host buffers faulted in and page-locked ahead, DMA'd without staging, and its
resume copies back from them.

``--serve`` measures glake's LLM engine (a random Llama-3-8B-shaped model in bf16, weights through
glake) going to sleep (level 1) and answering its next request: first-token latency awake and right
after the wake, against the time of a pinned host-to-device copy of the weights' bytes (same run),
and whether the greedy tokens after the wake equal those before. The wake's time is split into
the multipath engine's copies (its busy time and number of copies) and the driver's create/map/
set_access time. Two processes: one whose first sleep copies into fresh host memory, one that calls
``LLMEngine.prepare_sleep()`` first (as ``glake serve --prepare-sleep`` and ``--idle-suspend`` do).

    python3 benchmarks/suspend.py [--sizes-gib 1,16,80] [--probe] [--keep-host] [--prepared] [--serve]
    python3 benchmarks/suspend.py --sizes-gib= --serve     # the engine's sleep and wake only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import print_table, write_json  # noqa: E402

GiB = 1 << 30
MADV_HUGEPAGE, MADV_POPULATE_WRITE = 14, 23
PREFAULT_THREADS = 8


def _driver_ms(before: Dict[str, int], after: Dict[str, int], *ops: str) -> float:
    return sum(after[f"time_ns.{op}"] - before[f"time_ns.{op}"] for op in ops) / 1e6


def _thp() -> Dict[str, str]:
    out = {}
    for name in ("enabled", "defrag"):
        try:
            out[name] = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
        except OSError as e:
            out[name] = f"unreadable ({e.strerror})"
    return out


class _Anon:
    """Fresh anonymous host memory (as the suspend buffers are), optionally faulted in by threads."""

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def __init__(self, n: int) -> None:
        self.n = n
        self.ptr = self.libc.mmap(None, n, 3, 0x22 | 0x4000, -1, 0)  # RW, private|anonymous|noreserve
        if self.ptr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.libc.madvise(self.ptr, n, MADV_HUGEPAGE)

    def populate(self, threads: int) -> float:
        """Faults every page in with ``threads`` threads (MADV_POPULATE_WRITE); returns seconds."""
        per = (self.n // threads + 4095) // 4096 * 4096
        errors: List[int] = []

        def work(lo: int) -> None:
            size = min(per, self.n - lo)
            if size > 0 and self.libc.madvise(self.ptr + lo, size, MADV_POPULATE_WRITE) != 0:
                errors.append(ctypes.get_errno())

        pool = [threading.Thread(target=work, args=(t * per,)) for t in range(threads)]
        t0 = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        if errors:
            raise OSError(errors[0], "MADV_POPULATE_WRITE failed (kernel before 5.14?)")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.libc.munmap(self.ptr, self.n)


def probe(torch, xs) -> Dict[str, float]:
    """The parts of a suspend of ``xs`` (1 GiB tensors), each timed alone."""
    from glake import multipath

    n = len(xs) * GiB
    eng = multipath.engine("cuda", torch.cuda.current_device())
    gbs = lambda s: n / s / 1e9  # noqa: E731

    def copy_into(base: int, kind: str) -> float:
        t0 = time.perf_counter()
        for i, x in enumerate(xs):
            eng.copy_raw(base + i * GiB, x.data_ptr(), GiB, kind)
        return time.perf_counter() - t0

    out: Dict[str, float] = {}
    warm = _Anon(n)
    out["prefault_gbs"] = gbs(warm.populate(PREFAULT_THREADS))
    out["d2h_faulted_gbs"] = gbs(copy_into(warm.ptr, "device_to_pageable"))
    warm.close()
    fresh = _Anon(n)
    out["d2h_fresh_gbs"] = gbs(copy_into(fresh.ptr, "device_to_pageable"))
    fresh.close()
    t0 = time.perf_counter()
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    out["pinned_alloc_gbs"] = gbs(time.perf_counter() - t0)
    out["d2h_pinned_gbs"] = gbs(copy_into(pinned.data_ptr(), "device_to_pinned"))
    del pinned
    # registering faulted pageable memory with the driver (cudaHostRegister), then DMA straight into
    # and out of it: what a suspend would cost if its host buffers were pinned ahead of it
    cudart = torch.cuda.cudart()
    reg = _Anon(n)
    reg.populate(PREFAULT_THREADS)
    t0 = time.perf_counter()
    rc = cudart.cudaHostRegister(reg.ptr, n, 0)
    if int(rc) == 0:
        out["register_faulted_gbs"] = gbs(time.perf_counter() - t0)
        out["d2h_registered_gbs"] = gbs(copy_into(reg.ptr, "device_to_pinned"))
        t0 = time.perf_counter()
        for i, x in enumerate(xs):
            eng.copy_raw(x.data_ptr(), reg.ptr + i * GiB, GiB, "pinned_to_device")
        out["h2d_registered_gbs"] = gbs(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cudart.cudaHostUnregister(reg.ptr)
        out["unregister_gbs"] = gbs(time.perf_counter() - t0)
    reg.close()
    out.update(pinning_cost(torch, xs, copy_into))
    return out


class _CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _CUmemAllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _CUmemLocation),
                ("win32HandleMetaData", ctypes.c_void_p), ("compressionType", ctypes.c_ubyte),
                ("gpuDirectRDMACapable", ctypes.c_ubyte), ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", _CUmemLocation), ("flags", ctypes.c_int)]


def _on_threads(cu, threads: int, work) -> None:
    """Runs ``work(t)`` for t in range(threads), each on a thread of its own with the calling thread's
    CUDA context current (``cu``: libcuda), and waits for them all."""
    ctx = ctypes.c_void_p()
    cu.cuCtxGetCurrent(ctypes.byref(ctx))

    def run(t: int) -> None:
        cu.cuCtxSetCurrent(ctx)
        work(t)

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()


def _vmm_host(torch, n: int, threads: int):
    """``n`` bytes of page-locked host memory made through the driver's virtual memory API
    (cuMemCreate at CU_MEM_LOCATION_TYPE_HOST_NUMA 0, 1 GiB handles created by ``threads`` threads,
    mapped into one reserved range, read-write for this device and for the host); returns (address,
    seconds, release function)."""
    cu = ctypes.CDLL("libcuda.so.1")
    u64, size_t = ctypes.c_uint64, ctypes.c_size_t

    def ok(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what}: CUresult {rc}")

    prop = _CUmemAllocationProp(type=1, requestedHandleTypes=0, location=_CUmemLocation(3, 0))  # PINNED, HOST_NUMA
    gran = size_t()
    ok(cu.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 0), "cuMemGetAllocationGranularity")
    piece = max(GiB // gran.value, 1) * gran.value
    offsets = list(range(0, n, piece))
    handles = [u64() for _ in offsets]
    errors: List[str] = []

    def create(k0: int) -> None:
        for k in range(k0, len(offsets), threads):
            rc = cu.cuMemCreate(ctypes.byref(handles[k]), size_t(min(piece, n - offsets[k])), ctypes.byref(prop), u64(0))
            if rc != 0:
                errors.append(f"cuMemCreate(host): CUresult {rc}")
                return

    t0 = time.perf_counter()
    _on_threads(cu, threads, create)
    base = u64()
    mapped = 0

    def release() -> None:
        if mapped:
            cu.cuMemUnmap(u64(base.value), size_t(mapped))
        for h in handles:
            if h.value:
                cu.cuMemRelease(h)
        if base.value:
            cu.cuMemAddressFree(u64(base.value), size_t(n))

    try:
        if errors:
            raise RuntimeError(errors[0])
        ok(cu.cuMemAddressReserve(ctypes.byref(base), size_t(n), size_t(0), u64(0), u64(0)), "cuMemAddressReserve")
        for off, h in zip(offsets, handles):
            ok(cu.cuMemMap(u64(base.value + off), size_t(min(piece, n - off)), size_t(0), h, u64(0)), "cuMemMap(host)")
            mapped = off + min(piece, n - off)
        access = (_CUmemAccessDesc * 2)(_CUmemAccessDesc(_CUmemLocation(1, torch.cuda.current_device()), 3),
                                        _CUmemAccessDesc(_CUmemLocation(3, 0), 3))
        ok(cu.cuMemSetAccess(u64(base.value), size_t(n), access, size_t(2)), "cuMemSetAccess(device + host)")
    except RuntimeError:
        release()
        raise
    return base.value, time.perf_counter() - t0, release


def _host_alloc(n: int, threads: int):
    """``n`` bytes of cuMemHostAlloc(PORTABLE) memory (what glake's Driver::host_alloc_pinned makes), in
    1 GiB pieces allocated by ``threads`` threads; returns (piece addresses, seconds, free function)."""
    cu = ctypes.CDLL("libcuda.so.1")
    sizes = [min(GiB, n - off) for off in range(0, n, GiB)]
    ptrs = [ctypes.c_void_p() for _ in sizes]
    errors: List[str] = []

    def alloc(k0: int) -> None:
        for k in range(k0, len(sizes), threads):
            rc = cu.cuMemHostAlloc(ctypes.byref(ptrs[k]), ctypes.c_size_t(sizes[k]), ctypes.c_uint(1))  # PORTABLE
            if rc != 0:
                errors.append(f"cuMemHostAlloc: CUresult {rc}")
                return

    t0 = time.perf_counter()
    _on_threads(cu, threads, alloc)
    seconds = time.perf_counter() - t0

    def free() -> None:
        for q in ptrs:
            if q.value:
                cu.cuMemFreeHost(q)

    if errors:
        free()
        raise RuntimeError(errors[0])
    return [q.value for q in ptrs], seconds, free


def pinning_cost(torch, xs, copy_into) -> Dict[str, float]:
    """Device memory the driver takes for page-locked host memory of the suspend's size, by how it is
    page-locked (cudaHostRegister of faulted anonymous memory with transparent huge pages asked for;
    cuMemHostAlloc; cuMemCreate on the host through the virtual memory API), read right after it is
    made and again after a copy into all of it, and each one's make and copy speed."""
    from glake import multipath

    n = len(xs) * GiB
    gbs = lambda s: n / s / 1e9  # noqa: E731
    eng = multipath.engine("cuda", torch.cuda.current_device())
    out: Dict[str, float] = {}

    def device_taken(before: int) -> float:
        torch.cuda.synchronize()
        return (before - torch.cuda.mem_get_info()[0]) / (1 << 20)

    def copy_pieces(ptrs: List[int], kind: str) -> float:
        t0 = time.perf_counter()
        for p, x in zip(ptrs, xs):
            if kind == "device_to_pinned":
                eng.copy_raw(p, x.data_ptr(), GiB, kind)
            else:
                eng.copy_raw(x.data_ptr(), p, GiB, kind)
        return time.perf_counter() - t0

    cudart = torch.cuda.cudart()
    reg = _Anon(n)
    reg.populate(PREFAULT_THREADS)
    free0 = torch.cuda.mem_get_info()[0]
    if int(cudart.cudaHostRegister(reg.ptr, n, 0)) == 0:
        out["register_device_mib"] = device_taken(free0)
        copy_into(reg.ptr, "device_to_pinned")
        out["register_device_mib_copied"] = device_taken(free0)
        cudart.cudaHostUnregister(reg.ptr)
    reg.close()
    for threads in (1, PREFAULT_THREADS):
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        try:
            ptrs, made_s, free = _host_alloc(n, threads)
        except (OSError, RuntimeError) as e:
            out["host_alloc_error"] = str(e)
            break
        try:
            out[f"host_alloc_make_gbs_{threads}"] = gbs(made_s)
            if threads == 1:
                out["host_alloc_device_mib"] = device_taken(free0)
                out["d2h_host_alloc_gbs"] = gbs(copy_pieces(ptrs, "device_to_pinned"))
                out["host_alloc_device_mib_copied"] = device_taken(free0)
                out["h2d_host_alloc_gbs"] = gbs(copy_pieces(ptrs, "pinned_to_device"))
        finally:
            free()
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    try:
        ptr, made_s, release = _vmm_host(torch, n, 1)
    except (OSError, RuntimeError) as e:
        out["vmm_host_error"] = str(e)
        return out
    try:
        out["vmm_host_device_mib"] = device_taken(free0)
        out["vmm_host_make_gbs"] = gbs(made_s)
        out["d2h_vmm_host_gbs"] = gbs(copy_into(ptr, "device_to_pinned"))
        out["vmm_host_device_mib_copied"] = device_taken(free0)
        view = (ctypes.c_float * 4).from_address(ptr + (len(xs) - 1) * GiB)  # the host reads what the copy wrote
        out["vmm_host_cpu_reads_ok"] = float(list(view) == xs[-1][:4].cpu().tolist())
        out["h2d_vmm_host_gbs"] = gbs(copy_pieces([ptr + i * GiB for i in range(len(xs))], "pinned_to_device"))
    finally:
        release()
    return out


def worker(gib: int, with_probe: bool, cycles: int, prepare: bool = False) -> dict:
    import glake
    import glake.torch
    from glake import _C, core

    glake.torch.install()
    import torch

    base_free, total = torch.cuda.mem_get_info()
    xs = [torch.randn(GiB // 4, device="cuda") for _ in range(gib)]
    want = float(xs[-1].double().sum())
    torch.cuda.synchronize()
    held_free, _ = torch.cuda.mem_get_info()
    prepare_s = prepared = None
    if prepare:
        t0 = time.perf_counter()
        prepared = glake.prepare_suspend()
        prepare_s = time.perf_counter() - t0
    suspend_s, resume_s = [], []
    for _ in range(cycles):  # each cycle timed; the table shows the last
        c0 = core.stats("cuda")
        t0 = time.perf_counter()
        glake.suspend()
        t1 = time.perf_counter()
        c1 = core.stats("cuda")
        suspended_free, _ = torch.cuda.mem_get_info()
        t2 = time.perf_counter()
        glake.resume()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        c2 = core.stats("cuda")
        suspend_s.append(t1 - t0)
        resume_s.append(t3 - t2)
    got = float(xs[-1].double().sum())
    r = {"gib": gib, "suspend_s": suspend_s[-1], "resume_s": resume_s[-1], "suspend_s_cycles": suspend_s,
         "resume_s_cycles": resume_s, "base_free": base_free, "held_free": held_free,
         "suspended_free": suspended_free, "total": total, "intact": got == want,
         "prepare_s": prepare_s, "prepared_bytes": prepared,
         "prefault_threads": os.environ.get("GLAKE_SUSPEND_PREFAULT_THREADS", "8 (default)"),
         "keep_host": os.environ.get("GLAKE_SUSPEND_KEEP_HOST", "0"), "host_kept_bytes": _C.host_reserve_bytes(),
         "suspend_driver_ms": _driver_ms(c0, c1, "unmap", "release"),
         "resume_driver_ms": _driver_ms(c1, c2, "create", "map", "set_access")}
    if with_probe:
        r["probe"] = probe(torch, xs)
    return r


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def serve_worker(prompt_tokens: int, prepare: bool) -> dict:
    import glake.torch
    from glake import core, multipath

    glake.torch.install()
    import torch
    from transformers import LlamaConfig

    from glake.serve.engine import LLMEngine
    from glake.serve.models import random_model
    from glake.serve.sampling_params import SamplingParams

    config = LlamaConfig(**LLAMA3_8B)
    engine = LLMEngine(random_model(config, "cuda", torch.bfloat16), device="cuda", dtype=torch.bfloat16,
                       max_num_seqs=16, max_model_len=4096)
    prompt = [(7 * i + 3) % config.vocab_size for i in range(prompt_tokens)]

    def first_token():
        t0 = time.perf_counter()
        seqs = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        t_first = None
        while engine.has_unfinished():
            engine.step()
            if t_first is None and len(seqs[0].token_ids) > len(prompt):
                t_first = time.perf_counter() - t0
        return t_first, seqs[0].token_ids[len(prompt):]

    for _ in range(3):
        first_token()
    awake = [first_token() for _ in range(5)]
    awake_s = statistics.median(t for t, _ in awake)
    tokens_before = awake[-1][1]
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    free_awake, _ = torch.cuda.mem_get_info()
    prepare_s = None
    if prepare:  # what `glake serve --prepare-sleep` and --idle-suspend do while the engine is awake
        t0 = time.perf_counter()
        engine.prepare_sleep()
        prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.sleep()
    sleep_s = time.perf_counter() - t0
    free_asleep, _ = torch.cuda.mem_get_info()
    after_wake_s, tokens_after = first_token()
    engine.sleep()
    copier = multipath.engine("cuda", 0)  # the engine glake.resume copies through
    e0, c0 = copier.stats(), core.stats("cuda")
    t0 = time.perf_counter()
    engine.wake_up()
    torch.cuda.synchronize()
    wake_s = time.perf_counter() - t0
    e1, c1 = copier.stats(), core.stats("cuda")
    wake_parts = {"copy_ms": (e1["busy_ns"] - e0["busy_ns"]) / 1e6,
                  "copies": sum(e1[k] - e0[k] for k in e1 if k.startswith("calls.")),
                  "driver_ms": _driver_ms(c0, c1, "create", "map", "set_access")}
    engine.close()
    # the anchor: the weights' bytes from pinned host memory to the device, plain torch, same process
    host = torch.empty(weight_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(weight_bytes, dtype=torch.uint8, device="cuda")
    copies = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - t0)
    return {"weight_bytes": weight_bytes, "prompt_tokens": prompt_tokens, "ttft_awake_s": awake_s,
            "ttft_after_wake_s": after_wake_s, "sleep_s": sleep_s, "wake_s": wake_s, "prepare_s": prepare_s,
            "weights_copy_s": statistics.median(copies), "freed_by_sleep": free_asleep - free_awake, "wake": wake_parts,
            "same_tokens": tokens_after == tokens_before}


def run_worker(args: List[str], env=None) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, **(env or {})})
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gib", default="1,16,80")
    ap.add_argument("--probe", action="store_true", help="time the parts of a suspend alone")
    ap.add_argument("--prefault-threads", default="",
                    help="comma-separated GLAKE_SUSPEND_PREFAULT_THREADS values, one fresh-memory run per size each "
                         "(default: the library's default only)")
    ap.add_argument("--serve", action="store_true", help="an LLM engine's first token after a wake")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="the --serve request's prompt")
    ap.add_argument("--keep-host", action="store_true",
                    help="also two suspend/resume cycles with GLAKE_SUSPEND_KEEP_HOST=1 (the second suspend reuses "
                         "the first's host buffers)")
    ap.add_argument("--prepared", action="store_true",
                    help="also a process that calls glake.prepare_suspend() before its suspend (timed apart)")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cycles", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.probe, args.cycles, args.prepare)))
        return
    if args.serve_worker:
        print("RESULT " + json.dumps(serve_worker(args.prompt_tokens, args.serve_prepare)))
        return
    rows, probes, pinning, results, prepared = [], [], [], [], []
    # fresh host memory, faulted in ahead of the copy by the default number of threads or by each of
    # --prefault-threads; --keep-host adds the second of two cycles that keep their host buffers
    variants = [(f"fresh, {n} fault-ahead threads", {"GLAKE_SUSPEND_PREFAULT_THREADS": n}, 1, [])
                for n in args.prefault_threads.split(",") if n] or [("fresh", None, 1, [])]
    if args.keep_host:
        variants.append(("kept (2nd cycle)", {"GLAKE_SUSPEND_KEEP_HOST": "1"}, 2, []))
    if args.prepared:
        variants.append(("prepared", None, 1, ["--prepare"]))
    for gib in (int(x) for x in args.sizes_gib.split(",") if x):
        for k, (label, env, cycles, extra) in enumerate(variants):
            try:
                r = run_worker(["--worker", str(gib), "--cycles", str(cycles)] + extra +
                               (["--probe"] if args.probe and k == 0 else []), env)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                rows.append([gib, label, "error", "", "", "", "", "", "", ""])
                print(e)
                continue
            results.append(r)
            left = (r["base_free"] - r["suspended_free"]) / GiB  # what the process still holds beyond its start
            rows.append([gib, label, round(r["suspend_s"], 3), round(gib * GiB / r["suspend_s"] / 1e9, 1),
                         round(r["suspend_driver_ms"]), round(r["resume_s"], 3),
                         round(gib * GiB / r["resume_s"] / 1e9, 1), round(r["resume_driver_ms"]), round(left, 3),
                         r["intact"]])
            if "probe" in r:
                p = r["probe"]
                probes.append([gib, round(p["prefault_gbs"], 1), round(p["d2h_faulted_gbs"], 1),
                               round(p["d2h_fresh_gbs"], 1), round(p["pinned_alloc_gbs"], 1),
                               round(p["d2h_pinned_gbs"], 1)] +
                              [round(p[k], 1) if k in p else "-" for k in
                               ("register_faulted_gbs", "d2h_registered_gbs", "h2d_registered_gbs", "unregister_gbs")])
                for how, pre in (("cudaHostRegister", "register"), ("cuMemHostAlloc", "host_alloc"),
                                 ("cuMemCreate(host)", "vmm_host")):
                    pinning.append([gib, how] + [round(p[k], 2) if k in p else "-" for k in
                                                 (f"{pre}_device_mib", f"{pre}_device_mib_copied")] +
                                   [round(p[k], 1) if k in p else "-" for k in
                                    {"register": ("register_faulted_gbs", "-", "d2h_registered_gbs", "h2d_registered_gbs"),
                                     "host_alloc": ("host_alloc_make_gbs_1", f"host_alloc_make_gbs_{PREFAULT_THREADS}",
                                                    "d2h_host_alloc_gbs", "h2d_host_alloc_gbs"),
                                     "vmm_host": ("vmm_host_make_gbs", "-", "d2h_vmm_host_gbs", "h2d_vmm_host_gbs")}[pre]] +
                                   [p.get(f"{pre}_error", "")])
            if r.get("prepare_s") is not None:
                prepared.append([gib, round(r["prepare_s"], 2), round(r["prepared_bytes"] / r["prepare_s"] / 1e9, 1),
                                 round(r["prepared_bytes"] / GiB, 2)])
            print(f"  {gib} GiB, {label}: suspend {r['suspend_s']:.3f} s, resume {r['resume_s']:.3f} s", flush=True)
    if rows:
        print_table("glake.suspend / glake.resume (device synchronised around each)",
                    ["GiB", "host memory", "suspend s", "suspend GB/s", "of it unmap+release ms", "resume s",
                     "resume GB/s", "of it create+map ms", "GiB left vs start", "data intact"], rows)
    if prepared:
        print_table("glake.prepare_suspend() before the 'prepared' rows (host buffers faulted in and page-locked)",
                    ["GiB", "prepare s", "prepare GB/s", "GiB made ready"], prepared)
    payload: Dict[str, object] = {"args": vars(args), "results": results}
    if probes:
        payload["thp"] = _thp()
        print(f"transparent huge pages: {payload['thp']}")
        print_table(f"The parts of a suspend, each alone (GB/s; prefault = {PREFAULT_THREADS} threads, MADV_POPULATE_WRITE)",
                    ["GiB", "prefault fresh memory", "d2h into faulted pageable", "d2h into fresh pageable",
                     "pinned alloc", "d2h into pinned", "register faulted", "d2h registered",
                     "h2d registered", "unregister"], probes)
        print_table("Device memory the driver takes for that much page-locked host memory (MiB; right after it is "
                    "made, and after a copy into all of it), by how it is page-locked, and its speeds (GB/s; make: "
                    "register or allocate)",
                    ["GiB", "page-locked by", "device MiB", "after a copy", "make", f"make, {PREFAULT_THREADS} threads",
                     "d2h into it", "h2d from it", "error"], pinning)
    if args.serve:
        serve_rows = []
        for label, extra in (("fresh", []), ("prepared", ["--serve-prepare"])):
            try:
                sr = run_worker(["--serve-worker", "--prompt-tokens", str(args.prompt_tokens)] + extra)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(e)
                continue
            payload.setdefault("serve", {})[label] = sr
            ratio = sr["ttft_after_wake_s"] / sr["weights_copy_s"]
            serve_rows.append([label, round(sr["ttft_awake_s"] * 1e3, 1),
                               "-" if sr["prepare_s"] is None else round(sr["prepare_s"], 2),
                               round(sr["sleep_s"], 2), round(sr["freed_by_sleep"] / GiB, 1),
                               round(sr["ttft_after_wake_s"] * 1e3, 1), round(sr["wake_s"] * 1e3, 1),
                               f"{sr['wake']['copy_ms']:.0f} ({sr['wake']['copies']})", round(sr["wake"]["driver_ms"]),
                               round(sr["weights_copy_s"] * 1e3, 1), round(ratio, 2), sr["same_tokens"]])
            last = sr
        if serve_rows:
            print_table(f"LLM engine sleep / wake (Llama-3-8B shape, {last['weight_bytes'] / 1e9:.2f} GB of weights, "
                        f"{last['prompt_tokens']}-token prompt; target: first token after a wake <= 2x the weights' "
                        "copy; prepared: LLMEngine.prepare_sleep() first, timed apart)",
                        ["host memory", "TTFT awake ms", "prepare s", "sleep s", "GiB freed", "TTFT after wake ms",
                         "wake alone ms", "of it copies ms (n)", "of it driver ms", "weights pinned->GPU ms",
                         "after wake / copy", "same tokens"], serve_rows)
    write_json("suspend", payload)


if __name__ == "__main__":
    main()
