"""Fragmentation under training: torch native vs native + expandable_segments vs glake (and glake
with GMLake's 2 MiB physical chunks, `chunk_bytes:2MiB`).

Workloads (each allocator in its own process, same seeds, same batches):
  full   fine-tune a ~1.1B-parameter Llama-shaped decoder (random weights, bf16, AdamW, gradient
         checkpointing) on batches whose sequence length changes every step;
  lora   the same model frozen, with rank-16 LoRA adapters on every projection;
  trace  the allocation trace of `full` (recorded with torch's memory history under the native
         allocator) replayed through each allocator's raw alloc/free.
Columns: peak allocated, peak requested (exact bytes asked for), peak reserved, efficiency =
requested / reserved at their peaks (allocated / reserved also shown), median step time and the ratio
to native, all from the same run. With --max-batch, also the largest batch each allocator trains
under the same memory cap.

    python benchmarks/fragmentation.py [--steps 30] [--batch 8] [--seq-min 128 --seq-max 2048]
                                       [--workloads full,lora,trace] [--allocators native,expandable,glake]
                                       [--repeats 3 | --lockstep] [--max-batch --cap-gb 40]
With --lockstep (full, lora) every allocator's process is resident at once and the parent has
them train one step each in turn, on the same CPUs, so that the host's speed, which drifts over
time on a shared machine and decides a host-bound step (lora: the GPU is busy 158 ms of a 270-420 ms
step), is the same for all; the ratios are then paired step by step.
With --repeats N every allocator runs N times in its own process, the order alternating between
rounds (native, expandable, glake, then glake, expandable, native, ...), and the step time shown is
the median of the runs' medians with the runs' range beside it: the spread between processes on one
machine can exceed the differences measured.
The model has no rotary embedding (memory behaviour is unchanged); it is built in plain torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LineWorker, print_table, write_json  # noqa: E402

ALLOCATORS = ["native", "expandable", "glake", "glake-2mib"]
GLAKE_CONF = {"glake": {}, "glake-2mib": {"chunk_bytes": "2MiB"}}  # glake-2mib: GMLake's 2 MiB physical chunks
GiB = 1 << 30


# ---------------------------------------------------------------------------------------- model
def build_model(torch, dim, layers, heads, kv_heads, ffn, vocab, lora_rank=0):
    nn, F = torch.nn, torch.nn.functional

    class LoRALinear(nn.Module):
        def __init__(self, base: nn.Linear, rank: int) -> None:
            super().__init__()
            self.base = base
            self.a = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.01)
            self.b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

        def forward(self, x):
            return self.base(x) + (x @ self.a.t()) @ self.b.t()

    class DecoderLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            hd = dim // heads
            self.hd = hd
            self.n1, self.n2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
            self.q, self.o = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
            self.k, self.v = nn.Linear(dim, kv_heads * hd, bias=False), nn.Linear(dim, kv_heads * hd, bias=False)
            self.gate, self.up = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
            self.down = nn.Linear(ffn, dim, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.n1(x)
            q = self.q(h).view(b, t, heads, self.hd).transpose(1, 2)
            k = self.k(h).view(b, t, kv_heads, self.hd).transpose(1, 2)
            v = self.v(h).view(b, t, kv_heads, self.hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, dim))
            h = self.n2(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleList(DecoderLayer() for _ in range(layers))
            self.norm = nn.RMSNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, tokens):
            x = self.embed(tokens)
            for layer in self.layers:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            return self.head(self.norm(x))

    model = Decoder()
    if lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.layers:
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                setattr(layer, name, LoRALinear(getattr(layer, name), lora_rank))
    return model


# --------------------------------------------------------------------------------------- worker
def setup_allocator(kind: str, cap: float):
    if kind == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if kind in GLAKE_CONF:
        import glake.torch

        glake.torch.install(**GLAKE_CONF[kind], **({"limit_bytes": int(cap)} if cap else {}))
    import torch

    if cap and kind not in GLAKE_CONF:
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    return torch


def peaks(torch, kind: str) -> dict:
    if kind in GLAKE_CONF:
        import glake.torch as gt

        s = gt.memory_stats()
    else:
        s = torch.cuda.memory_stats()
    return {k: s[k] for k in ("allocated_bytes.all.peak", "reserved_bytes.all.peak", "requested_bytes.all.peak")} | {
        "num_alloc_retries": s.get("num_alloc_retries", 0), "num_stitches": s.get("num_stitches", 0)}


class GlakeProfile:
    """Where glake's time goes: its slow-path events and driver time per step over a window."""

    KEYS = ("num_stitches", "num_stitch_reuses", "num_segments_created", "num_segments_released",
            "num_sync_all_streams", "num_alloc_retries", "num_cross_stream_reuses")

    def _read(self) -> dict:
        import glake.core
        import glake.torch as gt

        s, d = gt.memory_stats(), glake.core.stats("cuda")
        out = {k: s[k] for k in self.KEYS}
        out["driver_ms"] = d["time_ns.total"] / 1e6
        out["driver_calls"] = sum(v for k, v in d.items() if k.startswith("calls."))
        for k, v in d.items():  # by entry point: where the driver time goes
            if k.startswith("time_ns.") and k != "time_ns.total":
                out["ms." + k[len("time_ns."):]] = v / 1e6
        return out

    def start(self) -> None:
        self.first = self._read()

    def per_step(self, steps: int) -> dict:
        last = self._read()
        return {k: round((last[k] - self.first[k]) / max(steps, 1), 3) for k in last}


def seq_lengths(steps: int, lo: int, hi: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    return [rng.randrange(lo, hi + 1, 64) for _ in range(steps)]


class Trainer:
    """One allocator's training run: the model, the optimizer and the step lengths, a step at a time."""

    def __init__(self, kind: str, args) -> None:
        self.torch = torch = setup_allocator(kind, args.cap)
        self.kind, self.args = kind, args
        torch.manual_seed(0)
        dims = dict(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn, vocab=args.vocab)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):  # built in place: no fp32 copy, no host-side init
            self.model = build_model(torch, **dims, lora_rank=16 if args.workload == "lora" else 0)
        torch.set_default_dtype(torch.float32)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.lens = seq_lengths(args.steps, args.seq_min, args.seq_max)
        self.warm = min(3, len(self.lens) - 1)  # steady state: the first steps build the cache
        self.profile = GlakeProfile() if kind in GLAKE_CONF else None
        self.losses = []
        if args.record_trace:
            torch.cuda.memory._record_memory_history(max_entries=2_000_000)

    def step(self, i: int) -> float:
        """Trains step `i`; returns its time in seconds (device synchronised before and after)."""
        torch, args = self.torch, self.args
        if self.profile and i == self.warm:
            self.profile.start()
        tokens = torch.randint(0, args.vocab, (args.batch, self.lens[i] + 1), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = self.model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, args.vocab), tokens[:, 1:].reshape(-1))
        del logits
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        self.losses.append(loss.item())
        return elapsed

    def result(self, times: list) -> dict:
        torch, args = self.torch, self.args
        out = {"median_step_s": statistics.median(times[self.warm:]), "step_s": times, "losses": self.losses[:3],
               **peaks(torch, self.kind), "params": sum(p.numel() for p in self.model.parameters())}
        if self.profile:
            out["per_step"] = self.profile.per_step(len(times) - self.warm)
        if args.record_trace:
            snap = torch.cuda.memory._snapshot()
            events = [(e["action"], e["addr"], e["size"]) for e in snap["device_traces"][0]
                      if e["action"] in ("alloc", "free_completed")]
            torch.cuda.memory._record_memory_history(enabled=None)
            Path(args.record_trace).write_text(json.dumps(events))
            out["trace_events"] = len(events)
        return out


def train_worker(kind: str, args) -> dict:
    trainer = Trainer(kind, args)
    return trainer.result([trainer.step(i) for i in range(len(trainer.lens))])


def lockstep_worker(kind: str, args) -> None:
    """Trains one step per ``STEP i`` line on stdin (answering its seconds); ``DONE`` answers the result."""
    trainer = Trainer(kind, args)
    times = []
    print("READY", flush=True)
    for line in sys.stdin:
        if line.startswith("DONE"):
            print("RESULT " + json.dumps(trainer.result(times)), flush=True)
            return
        times.append(trainer.step(int(line.split()[1])))
        print(f"RESULT {times[-1]}", flush=True)


def trace_worker(kind: str, args) -> dict:
    torch = setup_allocator(kind, args.cap)
    events = json.loads(Path(args.trace).read_text())
    live, requested, peak_requested = {}, 0, 0
    profile = GlakeProfile() if kind in GLAKE_CONF else None
    if profile:
        profile.start()
    t0 = time.perf_counter()
    for action, addr, size in events:
        if action == "alloc":
            live[addr] = (torch.cuda.caching_allocator_alloc(size), size)
            requested += size
            peak_requested = max(peak_requested, requested)
        elif addr in live:
            ptr, size = live.pop(addr)
            torch.cuda.caching_allocator_delete(ptr)
            requested -= size
    elapsed = time.perf_counter() - t0
    out = {"median_step_s": elapsed, **peaks(torch, kind), "events": len(events)}
    if profile:  # the whole replay (first steps' growth included) over the steps it recorded
        out["per_step"] = profile.per_step(args.steps)
    out["requested_bytes.all.peak"] = peak_requested  # what the trace asked for, the same for all
    return out


# ---------------------------------------------------------------------------------- orchestration
def worker_cmd(kind: str, workload: str, extra: list, args) -> list:
    return [sys.executable, __file__, "--worker", kind, "--workload", workload, *extra,
            "--steps", str(args.steps), "--batch", str(args.batch), "--seq-min", str(args.seq_min),
            "--seq-max", str(args.seq_max), "--dim", str(args.dim), "--layers", str(args.layers),
            "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--ffn", str(args.ffn),
            "--vocab", str(args.vocab), "--cap", str(args.cap)]


def run_worker(kind: str, workload: str, extra: list, args) -> dict:
    proc = subprocess.run(worker_cmd(kind, workload, extra, args), capture_output=True, text=True, timeout=1800)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(line[0][7:])


def lockstep(workload: str, kinds: list, args) -> dict:
    """Every allocator's process trains the same steps, one step each in turn (the order alternating),
    all on the same CPUs: the host's speed, which changes over time on a shared machine and decides a
    host-bound step (lora), is then the same for all. Each result gains ``paired``: per step, its time
    over every other allocator's time of the same step (median over the measured steps)."""
    allowed = sorted(os.sched_getaffinity(0))
    cpus = set(allowed[-min(4, len(allowed)):])
    workers = [LineWorker(kind, worker_cmd(kind, workload, ["--lockstep-worker"], args), cpus)
               for kind in kinds]  # all resident: memory for every one
    for i in range(args.steps):
        for w in workers if i % 2 == 0 else workers[::-1]:
            w.ask(f"STEP {i}")
    results = {w.name: w.ask("DONE") for w in workers}
    for w in workers:
        w.close()
    warm = min(3, args.steps - 1)
    for kind, r in results.items():
        r["paired"], r["paired_quartiles"] = {}, {}
        for other in kinds:
            if other != kind:
                ratios = [a / b for a, b in zip(r["step_s"][warm:], results[other]["step_s"][warm:])]
                r["paired"][other] = statistics.median(ratios)
                r["paired_quartiles"][other] = quartiles(ratios)
        r["step_quartiles"] = quartiles(r["step_s"][warm:])
    return results


def quartiles(xs: list) -> tuple:
    """First and third quartile of `xs` (the value itself for one)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def repeated(rounds: list) -> dict:
    """The run whose step time is the median of `rounds` (its peaks and profile with it), all step times beside."""
    bad = [r for r in rounds if "error" in r]
    if bad:
        return bad[0]
    ordered = sorted(rounds, key=lambda r: r["median_step_s"])
    return {**ordered[(len(ordered) - 1) // 2], "step_s_runs": [r["median_step_s"] for r in rounds]}


def max_batch(kind: str, args) -> dict:
    """Largest batch (binary search) that trains --steps steps at --seq-max under --cap-gb, and the peaks there."""
    lo, hi, best = args.max_batch_lo, args.max_batch_hi, {"batch": 0}
    while lo <= hi:
        mid = (lo + hi) // 2
        trial = argparse.Namespace(**{**vars(args), "batch": mid, "cap": args.cap_gb * GiB, "seq_min": args.seq_max // 2,
                                      "steps": args.max_batch_steps})
        res = run_worker(kind, "full", [], trial)
        if "error" in res:
            hi = mid - 1
        else:
            best, lo = {"batch": mid, **res}, mid + 1
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="full,lora,trace")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-min", type=int, default=128)
    ap.add_argument("--seq-max", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--cap", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", action="store_true", help="also search the largest batch under --cap-gb")
    # At 20 GiB the model's fixed ~8.2 GiB and ~0.67 GiB per sample bound every allocator to 16-17
    # (allocated bytes, not packing, decide; docs/results.md): a larger cap lets packing show.
    ap.add_argument("--cap-gb", type=float, default=40)
    ap.add_argument("--max-batch-lo", type=int, default=1, help="lower end of the max-batch search")
    ap.add_argument("--max-batch-hi", type=int, default=64, help="upper end of the max-batch search")
    ap.add_argument("--allocators", default=",".join(ALLOCATORS), help="which of " + ", ".join(ALLOCATORS))
    ap.add_argument("--repeats", type=int, default=1, help="processes per allocator and workload, order alternating")
    ap.add_argument("--max-batch-steps", type=int, default=6, help="steps each max-batch trial must survive")
    ap.add_argument("--lockstep", action="store_true",
                    help="full/lora: every allocator's process resident at once, one step each in turn, on the same CPUs")
    ap.add_argument("--lockstep-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=ALLOCATORS, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--record-trace", default="", help=argparse.SUPPRESS)
    ap.add_argument("--trace", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker and args.lockstep_worker:
        lockstep_worker(args.worker, args)
        return
    if args.worker:
        fn = trace_worker if args.workload == "trace" else train_worker
        print("RESULT " + json.dumps(fn(args.worker, args)))
        return

    workloads = [w for w in args.workloads.split(",") if w]  # --workloads "" with --max-batch: search only
    kinds = [k for k in args.allocators.split(",") if k]
    unknown = sorted(set(kinds) - set(ALLOCATORS))
    if unknown:
        ap.error(f"unknown allocator(s) {', '.join(unknown)}; choose from {', '.join(ALLOCATORS)}")
    results: dict = {}
    trace_file = os.path.join(tempfile.mkdtemp(), "trace.json")
    for workload in workloads:
        extra = []
        if workload == "trace":
            rec = run_worker("native", "full", ["--record-trace", trace_file], args)
            if "error" in rec:
                raise SystemExit(f"recording the trace failed: {rec['error']}")
            extra = ["--trace", trace_file]
        if args.lockstep and workload != "trace":
            print(f"running {workload} / {', '.join(kinds)} in lockstep ...", flush=True)
            results[workload] = lockstep(workload, kinds, args)
            continue
        rounds: dict = {k: [] for k in kinds}
        for r in range(args.repeats):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                print(f"running {workload} / {kind}" + (f" (run {r + 1} of {args.repeats})" if args.repeats > 1 else "") + " ...",
                      flush=True)
                rounds[kind].append(run_worker(kind, workload, extra, args))
        results[workload] = {k: repeated(rounds[k]) for k in kinds}
    def ratio(workload: str, kind: str, other: str):
        """`kind`'s step time over `other`'s: paired step by step in lockstep, else the ratio of the medians."""
        r = results[workload][kind]
        if other == kind:
            return 1
        if "paired" in r:  # with the middle half of the per-step ratios: how far the host's noise reaches
            if other not in r["paired"]:
                return ""
            q1, q3 = r["paired_quartiles"][other]
            return f"{r['paired'][other]:.3f} ({q1:.2f}-{q3:.2f})"
        base = results[workload].get(other, {}).get("median_step_s")
        return round(r["median_step_s"] / base, 3) if base else ""

    rows = []
    for workload in workloads:
        for kind in kinds:
            r = results[workload][kind]
            if "error" in r:
                rows.append([workload, kind, "error", "", "", "", "", "", "", "", ""])
                print(f"{workload}/{kind} failed:\n{r['error']}")
                continue
            res, req, alloc = r["reserved_bytes.all.peak"], r["requested_bytes.all.peak"], r["allocated_bytes.all.peak"]
            runs = r.get("step_s_runs", [r["median_step_s"]])
            if "step_quartiles" in r:  # lockstep: the middle half of this allocator's step times instead
                runs = list(r["step_quartiles"])
            rows.append([workload, kind, round(alloc / GiB, 2), round(req / GiB, 2), round(res / GiB, 2),
                         round(req / res, 3), round(alloc / res, 3), round(r["median_step_s"] * 1e3, 1),
                         f"{min(runs) * 1e3:.0f}-{max(runs) * 1e3:.0f}", ratio(workload, kind, "native"),
                         ratio(workload, kind, "expandable")])
    if rows:
        how = "lockstep, ratios paired by step" if args.lockstep else f"{args.repeats} process(es) per allocator"
        print_table(f"Fragmentation: batch {args.batch}, seq {args.seq_min}-{args.seq_max}, {args.steps} steps, {how}",
                    ["workload", "allocator", "peak alloc GiB", "peak requested GiB", "peak reserved GiB",
                     "requested/reserved", "alloc/reserved", "median step ms (trace: total)", "runs' range ms (lockstep: steps' middle half)",
                     "time / native", "time / expandable"], rows)
    profiled = [(f"{w} / {k}", results[w][k]["per_step"]) for w in workloads for k in kinds
                if "per_step" in results[w].get(k, {})]
    if profiled:
        keys = [k for k in profiled[0][1] if not k.startswith("ms.")]
        print_table("glake per measured step (trace: whole replay / steps): slow-path events and time in driver calls",
                    ["workload", *keys], [[w, *[p[k] for k in keys]] for w, p in profiled])
        by_op = [k for k in profiled[0][1] if k.startswith("ms.") and any(p[k] for _, p in profiled)]
        if by_op:
            print_table("glake per measured step: driver ms by call",
                        ["workload", *[k[3:] for k in by_op]], [[w, *[p[k] for k in by_op]] for w, p in profiled])
    if args.max_batch:
        mb = {kind: max_batch(kind, args) for kind in kinds}
        results["max_batch"] = {"cap_gb": args.cap_gb, "seq": args.seq_max, **mb}
        # peak allocated at the largest batch against the cap: how close packing came to the bytes asked for
        print_table(f"Largest batch at seq {args.seq_max // 2}-{args.seq_max} under {args.cap_gb} GiB "
                    f"({args.max_batch_steps} steps each)",
                    ["allocator", "max batch", "peak alloc GiB there", "peak reserved GiB there"],
                    [[k, v["batch"], round(v.get("allocated_bytes.all.peak", 0) / GiB, 2),
                      round(v.get("reserved_bytes.all.peak", 0) / GiB, 2)] for k, v in mb.items()])
    write_json("fragmentation" + ("_max_batch" if not workloads else ""), {"args": {k: v for k, v in vars(args).items() if k not in ("worker",)},
                                 "results": results})


if __name__ == "__main__":
    main()
