"""KV-cache growth: decode step time with chunks mapped on demand vs. everything pre-mapped.

Simulates continuous-batching decode of --seqs sequences with ShareGPT-like (prompt, output) lengths
(benchmarks/data/sharegpt_lengths.npz) on a Llama-3-8B-shaped glake.kvcache.KVCache (32 layers,
8 KV heads, 32 query heads, head_dim 128, bf16: 128 KiB per token, 16 tokens per 2 MiB chunk).
Every step does real work: reserve one more token per live sequence (the engine's hot path); per
layer, write the new token's K/V into the cache and run attention over every sequence's cached
tokens (gather of the backed rows + SDPA, sequences bucketed by length); admit the requests queued
by the previous step (reserve the prompt, write its K/V: a prefill); release the sequences that
ended and, for each, allocate a slot for the next request and prefetch its prompt (a scheduler
knows its queue; the request is admitted next step and decodes from the one after); synchronize.
Step times are wall-clock per step. The attention is a reference one (it copies the gathered rows
before SDPA reads them), so a step moves about three times the KV bytes a fused kernel would: the
ratio below is against that step, and the absolute wait and driver times are reported beside it.

Modes, all in one run with the same requests and the same work:
  premapped      anchor: every slot mapped up to the longest request before the run (no mapping at
                 all; --seqs x longest request x 128 KiB of GPU memory, ~32 GiB at 128 sequences)
  sync           chunks mapped on demand inside reserve() (lookahead 0: no background thread, so
                 prefetch is a no-op and reused slots keep their chunks)
  lookahead=N    chunks mapped on demand by the background mapper N tokens ahead (sync fallback)

Reported per mode: mean/p50/p99 step time and the ratio to premapped (target <= 1.02), steps in
which some reserve() had to map synchronously and the time it waited, chunks mapped in the
background / synchronously, and KV utilisation = sum over steps of tokens in use / sum over steps
of tokens the mapped chunks hold (released slots' kept chunks and lookahead included; target >= 0.96).
"util bound" is the utilisation of an ideal manager with the same lookahead on the same steps: each
live sequence backed up to exactly its length + lookahead, each queued request up to its prompt,
whole chunks only (DecodeSim.fewest_chunks). No chunk-granular manager can exceed it; with 16 tokens
per chunk the partial last chunk of each sequence alone costs a few percent at ShareGPT lengths.
"KV util" and "util bound" are sampled while the step's kernels run (after its launches, before its
releases): what the cache holds while the GPU uses it. "util at sync" and "bound at sync" are sampled
right after the step's device synchronisation, the one instant at which the sequences released during
the step still hold chunks no manager may have unmapped yet (the kernels that read them finished only
then), while the ideal manager has already dropped them: on a GPU that sample sits below its bound by
about one step's releases.

Then a fork workload: --fork-seqs sequences that share a --system-prompt-token prefix, each with its
own ShareGPT prompt and output: physical bytes with fork() vs. each sequence holding its own prefix.

    python3 benchmarks/kv_growth.py                                   # GPU, defaults below
    python3 benchmarks/kv_growth.py --backend host --seqs 8 --steps 20 --layers 4 --dtype float32
                                                                      # an end-to-end check on a host
    python3 benchmarks/kv_growth.py --backend host --no-attention --emulate-step-ms 5
                                      # the manager's logic (waits, utilisation) with the GIL free
                                      # during a 5 ms sleep per step: no step-time claim
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository's glake when run from a checkout

import torch  # noqa: E402

from _common import print_table, write_json  # noqa: E402
from kv_reserve_batch import reserve_batch_parts  # noqa: E402

from glake import core  # noqa: E402
from glake.kvcache import KVCache, attend, gather_index  # noqa: E402


def load_requests(path: Path, max_total: int, n: int, seed: int) -> np.ndarray:
    """``n`` (prompt, output) pairs resampled from the file with the usual serving filter."""
    d = np.load(path)
    p, o = d["prompt"], d["output"]
    keep = (p >= 4) & (o >= 4) & (p <= 1024) & (p + o <= min(2048, max_total))
    pairs = np.stack([p[keep], o[keep]], axis=1)
    rng = np.random.default_rng(seed)
    return pairs[rng.integers(0, len(pairs), n)]


class DecodeSim:
    """Continuous-batching decode over one KVCache; every mode replays the same request stream."""

    def __init__(self, kv: KVCache, args, requests: np.ndarray, seed: int) -> None:
        self.kv, self.args = kv, args
        self.requests = requests
        self.next_req = 0
        self.rng = np.random.default_rng(seed + 1)
        dev, dt = kv.device, kv.dtype
        L, B, H, D, HQ = args.layers, args.seqs, args.kv_heads, args.head_dim, args.q_heads
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.q = torch.randn(L, B, HQ, D, generator=g).to(device=dev, dtype=dt)
        self.k_new = torch.randn(L, B, H, D, generator=g).to(device=dev, dtype=dt)
        self.v_new = torch.randn(L, B, H, D, generator=g).to(device=dev, dtype=dt)
        self.slot: List[int] = []
        self.length: List[int] = []   # tokens cached (the next token is written at this position)
        self.left: List[int] = []     # tokens still to generate
        self.batch_us: List[float] = []  # host time of each step's one reserve_batch of all sequences
        # of it, the thread's CPU time, and its context switches (voluntary: it blocked; involuntary: it
        # was preempted): which tells a call that ran slowly from one that waited
        self.batch_cpu_us: List[float] = []
        self.first_submit_us: List[float] = []
        self.canary = ((torch.zeros(1, dtype=torch.int32).pin_memory(), torch.zeros(1, dtype=torch.int32, device=dev))
                       if args.first_submit and dev.type == "cuda" else None)
        self.batch_switches = [0, 0]
        self.last_batch = (np.zeros(0, np.int64), np.zeros(0, np.int64))  # the last step's (slots, lengths)
        self.phase_ms: Dict[str, List[float]] = {k: [] for k in PHASES}  # host ms of each step's phases
        self.pending: List[tuple] = []  # (batch position, slot, prompt, output) admitted next step
        for _ in range(B):           # start in steady state: each slot part-way through a request
            p, o = self.take_request()
            done = int(self.rng.integers(0, o))
            s = kv.allocate()
            self.prefill(s, p + done)
            self.slot.append(s)
            self.length.append(p + done)
            self.left.append(o - done)

    def take_request(self):
        p, o = self.requests[self.next_req % len(self.requests)]
        self.next_req += 1
        return int(p), int(o)

    def prefill(self, slot: int, n: int) -> None:
        self.kv.reserve(slot, n)
        for layer in range(self.args.layers if self.args.attention else 0):
            self.kv.k_cache(layer)[slot, :n].fill_(0.01)
            self.kv.v_cache(layer)[slot, :n].fill_(0.02)

    def step(self) -> None:
        kv, args = self.kv, self.args
        waiting = {i for i, *_ in self.pending}
        live = [i for i in range(len(self.slot)) if i not in waiting]
        batch_slots = np.fromiter((self.slot[i] for i in live), np.int64, len(live))
        batch_lens = np.fromiter((self.length[i] + 1 for i in live), np.int64, len(live))
        if self.canary is not None:  # --first-submit: the first submission after the sync is not reserve_batch's
            c = time.perf_counter_ns()
            self.canary[1].copy_(self.canary[0], non_blocking=True)
            self.first_submit_us.append((time.perf_counter_ns() - c) / 1e3)
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        kv.reserve_batch(batch_slots, batch_lens)  # the hot path: one call per step for all sequences
        t_reserved = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        self.batch_us.append((t_reserved - t0) / 1e3)
        self.batch_cpu_us.append((c1 - c0) / 1e3)
        self.batch_switches[0] += r1.ru_nvcsw - r0.ru_nvcsw
        self.batch_switches[1] += r1.ru_nivcsw - r0.ru_nivcsw
        self.last_batch = (batch_slots, batch_lens)
        live.sort(key=lambda i: self.length[i])
        slots = np.asarray([self.slot[i] for i in live])
        pos = np.asarray([self.length[i] for i in live])
        idx = torch.from_numpy(np.stack([slots, pos])).to(kv.device)
        t_slots, t_pos = idx[0], idx[1]
        t_len = t_pos + 1
        bounds = np.linspace(0, len(live), args.buckets + 1).astype(int)
        plans = [(a, b, gather_index(t_slots[a:b], t_len[a:b], int(pos[b - 1]) + 1))
                 for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if args.emulate_step_ms:
            time.sleep(args.emulate_step_ms / 1e3)
        t_planned = time.perf_counter_ns()
        n = len(live)
        for layer in range(args.layers if args.attention else 0):
            kc, vc = kv.k_cache(layer), kv.v_cache(layer)
            kc[t_slots, t_pos] = self.k_new[layer, :n]
            vc[t_slots, t_pos] = self.v_new[layer, :n]
            for a, b, plan in plans:
                attend(self.q[layer, a:b], kc, vc, plan)
        t_launched = time.perf_counter_ns()
        for i in live:
            self.length[i] += 1
            self.left[i] -= 1
        # what the KV holds while the step's kernels run (before this step's releases): see sample()
        self.in_step = self.sample()
        # admissions: the requests queued last step, whose prompts the mapper backed during this
        # step's work; they decode from the next step on
        for i, s, p, o in self.pending:
            self.prefill(s, p)
            self.slot[i], self.length[i], self.left[i] = s, p, o
        self.pending = []
        for i in live:
            if self.left[i] == 0:
                # the scheduler knows its queue: the next request gets a slot now and its prompt is
                # prefetched (mapped in the background while the next step runs)
                kv.release(self.slot[i])
                p, o = self.take_request()
                s = kv.allocate()
                kv.prefetch(s, p)
                self.pending.append((i, s, p, o))
        t_end = time.perf_counter_ns()
        for k, a, b in (("reserve_batch", t0, t_reserved), ("plan", t_reserved, t_planned),
                        ("launch", t_planned, t_launched), ("admit", t_launched, t_end)):
            self.phase_ms[k].append((b - a) / 1e6)

    def sample(self) -> tuple:
        """(tokens in use, chunks mapped, chunks an ideal manager would hold) now."""
        return self.tokens_in_use(), self.kv.physical_chunks, self.fewest_chunks(self.kv.lookahead_tokens)

    def fewest_chunks(self, lookahead: int) -> int:
        """Chunks an ideal manager with this lookahead would hold now: each live sequence backed up to
        its length + lookahead and each queued request up to its prompt, nothing else (no chunk kept
        for a later sequence, none left over from a shorter successor). The utilisation bound of
        any manager mapping whole chunks per sequence on this request stream."""
        queued = {i for i, *_ in self.pending}
        chunks_for = self.kv.layout.chunks_for
        return (sum(chunks_for(n + lookahead) for i, n in enumerate(self.length) if i not in queued)
                + sum(chunks_for(p) for _, _, p, _ in self.pending))

    def tokens_in_use(self) -> int:
        """Tokens held by live sequences (those that just ended do not count; their successor's prompt
        is not written yet)."""
        return sum(self.length) - sum(self.length[i] for i, *_ in self.pending)


# the host phases of a step (DecodeSim.step) and the device wait after it (run_mode)
PHASES = ("reserve_batch", "plan", "launch", "admit", "sync")


def torch_memory(kv: KVCache) -> Dict[str, int]:
    """torch's caching-allocator counters that tell whether its cache ran into the device's limit."""
    if kv.device.type != "cuda":
        return {}
    m = torch.cuda.memory_stats(kv.device)
    keys = ["num_alloc_retries", "num_device_alloc", "num_device_free", "reserved_bytes.all.peak"]
    return {k: int(m.get(k, 0)) for k in keys}


def sync(kv: KVCache, spin: bool = False) -> None:
    """Waits for the step's device work: torch.cuda.synchronize, or (``spin``, --spin-wait) polling an
    event recorded behind it until it completes, which keeps the engine's core running: after a ~40 ms
    blocking wait on an H200 host, host-only Python ran 3x slower and the first driver call took
    54-116 µs (benchmarks/first_submit.py), so whatever comes first in the next step pays that."""
    if kv.device.type != "cuda":
        return
    if not spin:
        torch.cuda.synchronize(kv.device)
        return
    ev = torch.cuda.Event()
    ev.record()
    while not ev.query():
        continue  # a busy wait, on purpose


def profile_steps(sim: "DecodeSim", kv: KVCache, steps: int, top: int = 8) -> List[Dict]:
    """`steps` more steps under torch.profiler: the ops that took the most device time (host time on
    the host backend), to tell which part of a step a mode slows."""
    from torch.profiler import ProfilerActivity, profile

    cuda = kv.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            sim.step()
            sync(kv)
    key = "device_time_total" if cuda else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    return [{"op": e.key, "ms_per_step": getattr(e, key, 0.0) / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in events[:top]]


def run_mode(name: str, lookahead: Optional[int], args, requests: np.ndarray, backend: str) -> Dict:
    kv = KVCache(args.layers, args.kv_heads, args.head_dim, args.dtype, max_seqs=args.seqs,
                 max_seq_len=args.max_seq_len, backend=backend, lookahead_tokens=lookahead or 0)
    try:
        if lookahead is None:  # premapped: every slot backed up to the longest request, then released
            longest = int((requests[:, 0] + requests[:, 1]).max())
            slots = [kv.allocate() for _ in range(args.seqs)]
            for s in slots:
                kv.reserve(s, longest)
            for s in slots:
                kv.release(s)
        sim = DecodeSim(kv, args, requests, args.seed)
        for _ in range(args.warmup):
            sim.step()
        sync(kv)
        kv.wait_mapper()
        s0, c0, t0_mem = kv.stats(), core.stats(backend), torch_memory(kv)
        times, waiting_steps, used, mapped, ideal = [], 0, 0, 0, 0
        step_used, step_mapped, step_ideal = 0, 0, 0
        sim.batch_us.clear()
        sim.batch_cpu_us.clear()
        sim.first_submit_us.clear()
        sim.batch_switches = [0, 0]
        for v in sim.phase_ms.values():
            v.clear()
        for _ in range(args.steps):
            w0 = kv.sync_waits
            t0 = time.perf_counter()
            sim.step()
            t_host = time.perf_counter()
            sync(kv, args.spin_wait)
            times.append(time.perf_counter() - t0)
            sim.phase_ms["sync"].append((times[-1] - (t_host - t0)) * 1e3)
            u, m, i = sim.sample()
            used, mapped, ideal = used + u, mapped + m, ideal + i
            u, m, i = sim.in_step
            step_used, step_mapped, step_ideal = step_used + u, step_mapped + m, step_ideal + i
            if kv.sync_waits > w0:
                waiting_steps += 1
        s1, c1, t1_mem = kv.stats(), core.stats(backend), torch_memory(kv)
        sync(kv)  # reserve_batch's parts with the device idle, on the last step's batch
        idle = reserve_batch_parts(kv, *sim.last_batch, iters=500)
        top = profile_steps(sim, kv, args.profile_steps) if args.profile_steps else []
        row = kv.layout.row_bytes
        chunk_tokens = kv.layout.chunk_bytes / row
        ms = sorted(t * 1e3 for t in times)
        return {
            "mode": name, "lookahead_tokens": lookahead, "steps": args.steps,
            "step_ms_mean": statistics.fmean(ms), "step_ms_p50": ms[len(ms) // 2],
            "step_ms_p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "steps_waiting": waiting_steps,
            "sync_waits": s1["sync_waits"] - s0["sync_waits"],
            "wait_ms": (s1["wait_ns"] - s0["wait_ns"]) / 1e6,
            "maps_background": s1["maps_background"] - s0["maps_background"],
            "maps_sync": s1["maps_sync"] - s0["maps_sync"],
            "reclaimed_released": s1["reclaimed_released"] - s0["reclaimed_released"],
            "mapper_busy_ms": (s1["mapper_busy_ns"] - s0["mapper_busy_ns"]) / 1e6,
            "driver_map_ms": (c1["time_ns.map"] - c0["time_ns.map"] + c1["time_ns.set_access"]
                              - c0["time_ns.set_access"] + c1["time_ns.create"] - c0["time_ns.create"]) / 1e6,
            "utilisation": step_used / (step_mapped * chunk_tokens) if step_mapped else 0.0,
            "utilisation_bound": step_used / (step_ideal * chunk_tokens) if step_ideal else 0.0,
            "utilisation_at_sync": used / (mapped * chunk_tokens) if mapped else 0.0,
            "utilisation_bound_at_sync": used / (ideal * chunk_tokens) if ideal else 0.0,
            "peak_chunks": s1["chunks_physical"],
            "reserve_batch_us_p50": statistics.median(sim.batch_us) if sim.batch_us else 0.0,
            "reserve_batch_cpu_us_p50": statistics.median(sim.batch_cpu_us) if sim.batch_cpu_us else 0.0,
            "first_submit_us_p50": statistics.median(sim.first_submit_us) if sim.first_submit_us else None,
            "reserve_batch_switches": {"voluntary": sim.batch_switches[0], "involuntary": sim.batch_switches[1]},
            "idle_batch_us": idle,
            "top_ops": top,
            "step_ms_each": [round(t * 1e3, 2) for t in times],  # in order: when a mode slows down
            # each step's host phases and its device wait, in order: which part a slow step spends in
            "phase_ms_each": {k: [round(x, 3) for x in v] for k, v in sim.phase_ms.items()},
            # torch's own caching allocator over the measured steps (the step's temporaries live there,
            # beside the KV cache): a retry is a cudaMalloc that failed, then torch freed its cache
            "torch_alloc": {k: t1_mem[k] - t0_mem[k] if k.startswith("num_") else t1_mem[k] for k in t1_mem},
        }
    finally:
        kv.close()


def fork_workload(args, requests: np.ndarray, backend: str) -> Dict:
    """Physical bytes of N sequences sharing a system prompt: fork() vs. private copies."""
    n, P = args.fork_seqs, args.system_prompt
    reqs = requests[: n]
    total = [P + int(p) + int(o) for p, o in reqs]
    res: Dict = {"sequences": n, "system_prompt_tokens": P}
    for use_fork in (False, True):
        kv = KVCache(args.layers, args.kv_heads, args.head_dim, args.dtype, max_seqs=n + 1,
                     max_seq_len=int(max(total)), backend=backend, lookahead_tokens=0)
        try:
            fork_s = []
            if use_fork:
                root = kv.allocate()
                kv.reserve(root, P)
                for layer in range(args.layers):
                    kv.k_cache(layer)[root, :P].fill_(0.5)
                for t in total:
                    t0 = time.perf_counter()
                    f = kv.fork(root, P)
                    sync(kv)
                    fork_s.append(time.perf_counter() - t0)
                    kv.reserve(f, t)
                    assert kv.k_cache(0)[f, P - 1, 0, 0].item() == 0.5  # the shared prefix reads through
                kv.release(root)  # the forks keep the prefix chunks alive
            else:
                for t in total:
                    s = kv.allocate()
                    kv.reserve(s, t)
            st = kv.stats()
            key = "with_fork" if use_fork else "without_fork"
            res[key] = {"physical_bytes": st["chunks_physical"] * kv.layout.chunk_bytes,
                        "chunks_shared": st["chunks_shared"], "fork_tail_bytes": st["fork_tail_bytes"]}
            if fork_s:
                res[key]["fork_us_mean"] = statistics.fmean(fork_s) * 1e6
        finally:
            kv.close()
    a, b = res["without_fork"]["physical_bytes"], res["with_fork"]["physical_bytes"]
    res["bytes_saved"] = a - b
    res["saved_fraction"] = (a - b) / a if a else 0.0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None, help="cuda or host (default: auto)")
    ap.add_argument("--seqs", type=int, default=128, help="sequences decoded at once (= slots)")
    ap.add_argument("--steps", type=int, default=300, help="measured decode steps per mode")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured steps first")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--lookahead", default="2,8", help="comma-separated lookahead_tokens values to run")
    ap.add_argument("--buckets", type=int, default=4, help="length buckets of the batch attention")
    ap.add_argument("--repeats", type=int, default=1, help="run every mode this many times (pooled)")
    ap.add_argument("--reversed", action="store_true",
                    help="start with the last mode (premapped last, then first again with --repeats 2)")
    ap.add_argument("--fork-seqs", type=int, default=64)
    ap.add_argument("--system-prompt", type=int, default=1000, help="shared prefix tokens of the fork workload")
    ap.add_argument("--no-attention", dest="attention", action="store_false",
                    help="skip the K/V writes and attention: steps then time the manager alone (for quick "
                         "utilisation studies; not the step-time comparison)")
    ap.add_argument("--first-submit", action="store_true",
                    help="before each step's reserve_batch, time a 4-byte host-to-device copy of its own: the "
                         "step's first submission to the device after the previous step's synchronisation")
    ap.add_argument("--spin-wait", action="store_true",
                    help="wait for each step by polling an event (the engine's core keeps running) instead of "
                         "torch.cuda.synchronize")
    ap.add_argument("--emulate-step-ms", type=float, default=0.0,
                    help="with --no-attention: sleep this long per step in place of the GPU work, to check the "
                         "mapper's logic on a host (a sleep frees the GIL, kernel launches do not: no step-time claim)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="after the measured steps, profile this many more and print each mode's costliest ops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(HERE / "data" / "sharegpt_lengths.npz"))
    args = ap.parse_args()

    backend = core.backend_name(args.backend)
    requests = load_requests(Path(args.data), args.max_seq_len, 100_000, args.seed)
    modes = [("premapped", None), ("sync", 0)] + [(f"lookahead={n}", int(n)) for n in args.lookahead.split(",") if n]
    results: Dict[str, List[Dict]] = {name: [] for name, _ in modes}
    # A discarded run first, as long as a measured one, so that whichever mode runs first does not pay
    # for the process's first kernels, cuBLAS/SDPA set-up and torch's own cache growth (after a shorter
    # warm-up the first measured run slowed 2x, whichever mode it was: docs/results.md, "the premapped
    # anomaly explained").
    warm = argparse.Namespace(**{**vars(args), "steps": args.steps})
    run_mode("warm-up", 0, warm, requests, backend)
    for r in range(args.repeats):
        for name, la in (modes if (r % 2 == 0) != args.reversed else modes[::-1]):
            results[name].append(run_mode(name, la, args, requests, backend))
            r = results[name][-1]
            print(f"  {name}: {r['step_ms_mean']:.3f} ms/step; torch's allocator: {r['torch_alloc']}", flush=True)

    def pooled(rs: List[Dict], key: str) -> float:
        return statistics.fmean(r[key] for r in rs)

    anchor = pooled(results["premapped"], "step_ms_mean")
    rows, summary = [], []
    for name, la in modes:
        rs = results[name]
        mean = pooled(rs, "step_ms_mean")
        steps = sum(r["steps"] for r in rs)
        waiting = sum(r["steps_waiting"] for r in rs)
        util = pooled(rs, "utilisation")
        bound = pooled(rs, "utilisation_bound") if la is not None else None  # premapped: no such bound
        util_sync = pooled(rs, "utilisation_at_sync")
        bound_sync = pooled(rs, "utilisation_bound_at_sync") if la is not None else None
        summary.append({"mode": name, "lookahead_tokens": la, "step_ms_mean": mean, "ratio_vs_premapped": mean / anchor,
                        "step_ms_p99": pooled(rs, "step_ms_p99"), "steps_waiting": waiting,
                        "wait_ms_per_step": sum(r["wait_ms"] for r in rs) / steps,
                        "maps_background": sum(r["maps_background"] for r in rs),
                        "maps_sync": sum(r["maps_sync"] for r in rs), "utilisation": util,
                        "utilisation_bound": bound, "utilisation_at_sync": util_sync,
                        "utilisation_bound_at_sync": bound_sync,
                        "reserve_batch_us_p50": statistics.median(r["reserve_batch_us_p50"] for r in rs)})
        rows.append([name, round(mean, 3), round(pooled(rs, "step_ms_p99"), 3), round(mean / anchor, 4),
                     f"{waiting}/{steps}", round(sum(r["wait_ms"] for r in rs) / steps, 4),
                     sum(r["maps_background"] for r in rs), sum(r["maps_sync"] for r in rs), round(util, 4),
                     "-" if bound is None else round(bound, 4), round(util_sync, 4),
                     "-" if bound_sync is None else round(bound_sync, 4),
                     round(statistics.median(r["reserve_batch_us_p50"] for r in rs), 1)])
    shape = f"{args.layers}L x {args.kv_heads} KV heads x {args.head_dim} x {args.dtype}"
    if not args.attention:
        shape += ", NO attention (manager only" + (f", {args.emulate_step_ms} ms sleep per step)"
                                                  if args.emulate_step_ms else ")")
    print_table(f"KV growth, backend={backend}, {args.seqs} sequences, {shape}, {args.steps} steps x {args.repeats}",
                ["mode", "step ms", "p99 ms", "vs premapped", "steps waiting", "wait ms/step", "maps bg",
                 "maps sync", "KV util", "util bound", "util at sync", "bound at sync", "reserve_batch us"], rows)
    half = lambda xs, first: xs[:len(xs) // 2] if first else xs[len(xs) // 2:]  # noqa: E731
    print_table("Where a step's time goes (ms per step: host phases, then the device wait), first and second half",
                ["mode", "half", *PHASES, "step"],
                [[name, h, *[round(statistics.fmean(half(results[name][0]["phase_ms_each"][k], h == "1st")), 2)
                             for k in PHASES],
                  round(statistics.fmean(half(results[name][0]["step_ms_each"], h == "1st")), 2)]
                 for name, _ in modes for h in ("1st", "2nd") if results[name][0]["step_ms_each"]])
    wait = "polling an event (--spin-wait)" if args.spin_wait else "torch.cuda.synchronize"
    print_table("reserve_batch inside the step (host µs, median; the thread's CPU time of it; context switches "
                f"during the calls: voluntary = it blocked, involuntary = it was preempted; steps waited for by {wait})",
                ["mode", "wall us", "thread CPU us", "voluntary switches", "involuntary switches", "calls",
                 "a 4-byte copy before it us (--first-submit)"],
                [[name, round(statistics.median(r["reserve_batch_us_p50"] for r in results[name]), 1),
                  round(statistics.median(r["reserve_batch_cpu_us_p50"] for r in results[name]), 1),
                  sum(r["reserve_batch_switches"]["voluntary"] for r in results[name]),
                  sum(r["reserve_batch_switches"]["involuntary"] for r in results[name]),
                  sum(r["steps"] for r in results[name]),
                  "-" if results[name][0]["first_submit_us_p50"] is None
                  else round(statistics.median(r["first_submit_us_p50"] for r in results[name]), 1)] for name, _ in modes])
    print_table("reserve_batch's parts with the device idle (host µs, median of 500 calls on the last step's batch)",
                ["mode", *results[modes[0][0]][0]["idle_batch_us"]],
                [[name, *[round(statistics.median(r["idle_batch_us"][k] for r in results[name]), 1)
                          for k in results[name][0]["idle_batch_us"]]] for name, _ in modes])
    if args.profile_steps:
        top_rows = [[name, t["op"][:60], round(t["ms_per_step"], 3), round(t["calls_per_step"], 1)]
                    for name, _ in modes for t in results[name][0]["top_ops"]]
        print_table(f"Costliest ops per mode ({args.profile_steps} profiled steps; device time on cuda)",
                    ["mode", "op", "ms / step", "calls / step"], top_rows)

    fork = fork_workload(args, requests, backend) if args.fork_seqs > 0 else None
    if fork:
        w, wo = fork["with_fork"], fork["without_fork"]
        print_table(f"Fork: {fork['sequences']} sequences sharing a {fork['system_prompt_tokens']}-token system prompt",
                    ["", "physical MiB", "shared chunks", "tail bytes copied", "fork() us"],
                    [["without fork", wo["physical_bytes"] >> 20, 0, 0, "-"],
                     ["with fork", w["physical_bytes"] >> 20, w["chunks_shared"], w["fork_tail_bytes"],
                      round(w.get("fork_us_mean", 0.0), 1)],
                     ["saved", fork["bytes_saved"] >> 20, "", "", f"{100 * fork['saved_fraction']:.1f}%"]])
    write_json(f"kv_growth_{backend}", {"backend": backend, "args": vars(args), "summary": summary,
                                        "runs": results, "fork": fork})


if __name__ == "__main__":
    main()
