"""Offline serving throughput of glake.serve on a Llama-3-8B-shaped model with random bf16 weights.

The workload: 512 (prompt, output) length pairs of ShareGPT (benchmarks/data/sharegpt_lengths.npz,
seed 0, prompt >= 4, output >= 4, prompt <= 1024, prompt + output <= 2048: 123,458 prompt and 107,379
output tokens), random prompt ids, greedy, exactly the drawn output length (ignore_eos). Nothing is
downloaded. Prints output and total tok/s, then one decode step at --profile-batch (256) broken down by
kernel class (torch.profiler) against its GEMMs and attention run alone, and HF transformers'
continuous batching on the same requests (`--hf`, the anchor; same process, after glake's run).

    python3 benchmarks/serve_offline.py                    # GPU: the 8B shape, 512 requests
    python3 benchmarks/serve_offline.py --hf               # ... and the HF anchor (about 150 s on an H200)
    python3 benchmarks/serve_offline.py --tiny --requests 16   # CPU smoke run on a tiny shape
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402
from _gpu_trace import profile_steps  # noqa: E402

HERE = Path(__file__).resolve().parent
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False)


def load_requests(path: Path, n: int, seed: int, max_prompt: int = 1024, max_total: int = 2048) -> np.ndarray:
    """``[n, 2]`` (prompt, output) lengths drawn without replacement from the kept ShareGPT pairs."""
    d = np.load(path)
    p, o = d["prompt"], d["output"]
    keep = (p >= 4) & (o >= 4) & (p <= max_prompt) & (p + o <= max_total)
    pairs = np.stack([p[keep], o[keep]], 1)
    return pairs[np.random.default_rng(seed).choice(len(pairs), n, replace=False)]


def make_prompts(requests: np.ndarray, vocab: int, seed: int) -> List[List[int]]:
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab, int(p)).tolist() for p, _ in requests]


KERNEL_CLASSES = (("attention", ("_split_kernel", "_merge_kernel", "flash")),
                  ("fused", ("_rms_norm_kernel", "_rope_cache_kernel", "_silu_mul_kernel")),
                  ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk")),
                  ("sampling", ("argmax", "topk", "sort", "softmax", "exponential")))


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_decode_step(torch, engine, steps: int = 5) -> Dict[str, float]:
    """One decode step's wall time without the profiler, and its device time by kernel class under it
    (ms, means of ``steps`` steps each)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    out = {"wall": wall}
    for ev in prof.key_averages():
        dev = getattr(ev, "device_time_total", None)
        if dev is None:
            dev = getattr(ev, "cuda_time_total", 0)
        if dev and ev.device_type.name == "CUDA":
            cls = classify(ev.key)
            out[cls] = out.get(cls, 0.0) + dev / 1e3 / steps
    out["gpu_busy"] = sum(v for k, v in out.items() if k not in ("wall",))
    out["gpu_idle_frac"] = max(0.0, 1 - out["gpu_busy"] / wall)
    return out


def host_phases(torch, engine, steps: int = 5) -> Dict[str, float]:
    """Host wall time per decode step in each phase (ms): scheduling, KV reservation (chunk maps),
    the model runner (staging and the graph launch), the sampler's launch, and the rest of the step
    (waiting for the sampled ids, then appending them and checking stops)."""
    spent: Dict[str, float] = {}
    patched = []

    def wrap(obj, name: str) -> None:
        fn = getattr(obj, name)
        patched.append((obj, name, vars(obj).get(name)))

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        setattr(obj, name, timed)

    for obj, name in ((engine.scheduler, "schedule"), (engine.kv, "reserve_batch"), (engine.runner, "run"),
                      (engine, "sampler")):
        wrap(obj, name)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - t0
    for obj, name, original in patched:  # back as they were: an instance attribute, or the class's method
        if original is None:
            delattr(obj, name)
        else:
            setattr(obj, name, original)
    out = {f"host_{k}_ms": v * 1e3 / steps for k, v in spent.items()}
    out["host_rest_ms"] = (total - sum(spent.values())) * 1e3 / steps
    return out


def alone_ms(torch, fn, reps: int = 10) -> float:
    """Device time of ``fn`` replayed from a CUDA graph (no launch gaps), ms per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def gemms_alone(torch, model, m: int) -> float:
    """The step's GEMMs at M = ``m`` rows, run back to back with the model's weights (ms)."""
    lin = [mod for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    xs = {mod.in_features: torch.randn(m, mod.in_features, device="cuda", dtype=mod.weight.dtype) for mod in lin}

    def run():
        for mod in lin:
            torch.nn.functional.linear(xs[mod.in_features], mod.weight, mod.bias)
    return alone_ms(torch, run)


def attention_alone(torch, engine) -> float:
    """Every layer's decode attention over the running sequences' cache rows, alone (ms)."""
    from glake.serve.kernels.decode_attention import decode_attention

    seqs = engine.scheduler.running
    kv, a = engine.kv, engine.model.args
    slots = torch.tensor([s.slot for s in seqs], device="cuda", dtype=torch.int32)
    lens = torch.tensor([s.num_cached_tokens for s in seqs], device="cuda", dtype=torch.int32)
    q = torch.randn(len(seqs), a.num_heads, a.head_dim, device="cuda", dtype=kv.dtype)
    top = max(s.num_cached_tokens for s in seqs)

    def run():
        for layer in range(a.num_layers):
            decode_attention(q, kv.k_cache(layer), kv.v_cache(layer), slots, lens, top)
    return alone_ms(torch, run)


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The options serve_offline and serve_online share: the requests and the engine's limits."""
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    # 512 / 16384: all 512 requests admitted at once (8,513 output tok/s against 6,936 at 256 / 8192
    # in one H200 run, 2026-12-03; docs/results.md)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-budget", default="", help="KV cache bytes, e.g. 60GiB (default: the device's memory)")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (CPU smoke runs)")
    ap.add_argument("--hf", action="store_true", help="also run HF transformers' continuous batching (the anchor)")
    ap.add_argument("--data", default=str(HERE / "data" / "sharegpt_lengths.npz"))


def make_engine(torch, args, config, device: str):
    """glake's engine over a random model of ``config``'s shape (bf16 on cuda, fp32 on cpu)."""
    from glake.serve.engine import LLMEngine
    from glake.serve.models import random_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return LLMEngine(random_model(config, device, dtype, seed=args.seed), device=device, dtype=dtype,
                     max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                     max_num_batched_tokens=args.max_num_batched_tokens, kv_memory_budget=args.kv_budget or None)


def hf_manager(torch, config, seed: int, device: str, max_new_tokens: int):
    """HF transformers' ContinuousBatchingManager (started) over a random model of ``config``'s shape."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    for attn in ("paged|sdpa", "sdpa"):  # transformers 5.17 takes the first, later releases only the second
        model.config._attn_implementation = attn
        try:
            manager = model.init_continuous_batching(generation_config=gen)
            break
        except ValueError as e:
            print(f"HF: attention {attn!r} refused ({e})", flush=True)
    else:
        raise RuntimeError("no attention implementation accepted by continuous batching")
    print(f"HF: continuous batching with {attn!r}", flush=True)
    manager.start()
    return model, manager


class StepTimeline:
    """Each step of the measured run: its wall time, the batch it launched and how long the host waited
    for the GPU in it (reading the sampled ids), so that steps can be told apart by kind and batch size:
    a step whose host waited is bound by the GPU, one whose host did not is bound by the host."""

    def __init__(self, engine) -> None:
        self.engine, self.rows = engine, []
        self._batch, self._wait = None, 0.0
        run, complete = engine.runner.run, engine._complete

        def timed_run(batch, ids=None):
            self._batch = (len(batch.seqs), int(sum(batch.num_new)), all(n == 1 for n in batch.num_new))
            return run(batch, ids)

        def timed_complete(step, ahead=None):
            t = time.perf_counter()
            step.out.to_host()  # the wait for the GPU; the engine's own read then finds the ids ready
            self._wait += time.perf_counter() - t
            return complete(step, ahead)
        engine.runner.run, engine._complete = timed_run, timed_complete

    def step(self):
        self._batch, self._wait = None, 0.0
        t = time.perf_counter()
        done = self.engine.step()
        self.rows.append((time.perf_counter() - t, self._wait, self._batch))
        return done

    def close(self) -> None:
        del self.engine.runner.run, self.engine._complete

    def classes(self) -> List[Dict[str, float]]:
        """Steps grouped: those with prefill tokens, then decode-only ones by batch size."""
        bounds = (32, 64, 128, 256, 384, 512, 1 << 30)
        groups: Dict[Tuple[int, str], List] = {}
        for wall, wait, b in self.rows:
            if b is None:
                key = (-2, "no launch")
            elif not b[2]:
                key = (-1, "prefill (+decode)")
            else:
                top = next(x for x in bounds if b[0] <= x)
                key = (top, f"decode <= {top}" if top < (1 << 30) else f"decode > {bounds[-2]}")
            groups.setdefault(key, []).append((wall, wait, b))
        out = []
        for (_, key), rows in sorted(groups.items()):
            n = len(rows)
            out.append({"kind": key, "steps": n, "seconds": sum(r[0] for r in rows),
                        "mean_ms": 1e3 * sum(r[0] for r in rows) / n, "wait_ms": 1e3 * sum(r[1] for r in rows) / n,
                        "mean_seqs": sum(r[2][0] for r in rows if r[2]) / n,
                        "mean_tokens": sum(r[2][1] for r in rows if r[2]) / n})
        return out


def run_glake(torch, args, config, prompts, outputs) -> Dict[str, float]:
    from glake.serve import SamplingParams

    t0 = time.perf_counter()
    engine = make_engine(torch, args, config, args.device)
    build_s = time.perf_counter() - t0
    res: Dict[str, float] = {"build_s": build_s}
    try:
        # warm-up: a few requests through prefill and decode (kernels compiled, allocator warm)
        for p in prompts[:4]:
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        seqs = []
        for p, n in zip(prompts, outputs):
            seqs += engine.add_request(p, SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True))
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seqs), desc="glake.serve", unit="req", disable=args.no_progress)
        steps, biggest = 0, 0
        if args.device == "cuda":
            torch.cuda.synchronize()
        timeline = StepTimeline(engine) if args.timeline else None
        step = timeline.step if timeline else engine.step
        pending, traces, sched = sorted(args.trace, reverse=True), [], engine.scheduler

        def one():
            nonlocal steps, biggest
            done = step()
            steps += 1
            biggest = max(biggest, len(sched.running))
            bar.update(len(done))

        t0 = time.perf_counter()
        if args.trace_first and args.device == "cuda":
            t = time.perf_counter()
            trace = profile_steps(torch, one, args.trace_first, classify)
            trace.update(at_most="first steps", running=len(sched.running),
                         wall_ms=(time.perf_counter() - t) * 1e3 / args.trace_first)
            traces.append(trace)
        while engine.has_unfinished():
            if pending and not sched.waiting and len(sched.running) <= pending[0] and args.device == "cuda":
                at = pending.pop(0)
                while pending and len(sched.running) <= pending[0]:
                    pending.pop(0)
                t = time.perf_counter()
                trace = profile_steps(torch, one, args.trace_steps, classify)
                trace.update(at_most=f"<= {at}", running=len(sched.running),
                             wall_ms=(time.perf_counter() - t) * 1e3 / args.trace_steps)
                traces.append(trace)
                continue
            one()
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        bar.close()
        out_tok = sum(s.num_output_tokens for s in seqs)
        assert out_tok == int(outputs.sum()), (out_tok, int(outputs.sum()))
        res.update(elapsed_s=elapsed, steps=steps, output_tokens=out_tok, prompt_tokens=sum(len(p) for p in prompts),
                   max_batch=biggest, preemptions=engine.scheduler.stats.preempted_recompute + engine.scheduler.stats.preempted_swap)
        res["output_tok_s"] = out_tok / elapsed
        if traces:
            res["traces"] = traces
        if timeline:
            timeline.close()
            res["timeline"] = timeline.classes()
            if args.device == "cuda":
                for row in res["timeline"]:
                    if row["mean_tokens"]:
                        row["gemms_alone_ms"] = gemms_alone(torch, engine.model, max(1, round(row["mean_tokens"])))
        res["total_tok_s"] = (out_tok + res["prompt_tokens"]) / elapsed
        if args.device == "cuda" and not args.no_profile:
            res.update(breakdown(torch, engine, prompts, args))
    finally:
        engine.close()
        del engine
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return res


def breakdown(torch, engine, prompts, args) -> Dict[str, float]:
    """A decode step at ``--profile-batch`` (at most ``max_num_seqs``): that many requests prefilled, then
    profiled decodes."""
    from glake.serve import SamplingParams

    for p in prompts[:min(args.profile_batch, args.max_num_seqs)]:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_cached_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    engine.step()
    batch = len(engine.scheduler.running)
    prof = profile_decode_step(torch, engine)
    host = host_phases(torch, engine)
    res = {f"step_{k}_ms" if k != "gpu_idle_frac" else "step_gpu_idle_frac": v for k, v in prof.items()}
    res.update(host)
    res["step_batch"] = batch
    res["gemms_alone_ms"] = gemms_alone(torch, engine.model, batch)
    res["attention_alone_ms"] = attention_alone(torch, engine)
    res["step_over_alone"] = prof["wall"] / (res["gemms_alone_ms"] + res["attention_alone_ms"])
    engine.scheduler.abort_all()
    return res


def run_hf(torch, args, config, prompts, outputs) -> Dict[str, float]:
    """HF transformers' continuous batching (``paged|sdpa``) on the same requests and random weights."""
    model, manager = hf_manager(torch, config, args.seed, "cuda", int(max(outputs)))
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=int(n)) for p, n in zip(prompts, outputs)]
        got, out_tok = 0, 0
        while got < len(ids):
            r = manager.get_result(timeout=600)
            if r is None:
                raise RuntimeError("HF continuous batching returned no result in 600 s")
            got += 1
            out_tok += len(r.generated_tokens)
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return {"elapsed_s": elapsed, "output_tokens": out_tok, "output_tok_s": out_tok / elapsed,
            "total_tok_s": (out_tok + sum(len(p) for p in prompts)) / elapsed}


def print_trace(tr: Dict) -> None:
    """One --trace window: the device's busy time per step, by class and kernel, and its idle gaps."""
    print(f"\nTrace at {tr['at_most']} running ({tr['running']} after it), {tr['steps']} steps: wall "
          f"{tr['wall_ms']:.2f} ms/step (profiled), device span {tr['span_ms']:.2f}, busy {tr['busy_ms']:.2f}, "
          f"idle {100 * tr['idle_frac']:.1f}%, {tr['activities_per_step']:.0f} activities/step")
    print_table("device ms per step by class", list(tr["classes"]), [[round(v, 3) for v in tr["classes"].values()]])
    print_table("kernels (per step)", ["kernel", "ms", "calls", "mean us"],
                [[k["name"], round(k["ms_per_step"], 3), round(k["calls_per_step"], 1), round(k["mean_us"], 1)]
                 for k in tr["kernels"]])
    print_table("idle gaps (per step)", ["gap", "count", "ms"],
                [[b, round(v["count_per_step"], 1), round(v["ms_per_step"], 3)] for b, v in tr["gaps"].items()])
    print_table("largest gaps", ["us", "after", "before"], [[g["us"], g["after"], g["before"]] for g in tr["largest_gaps"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-profile", action="store_true", help="skip the decode-step breakdown")
    ap.add_argument("--profile-batch", type=int, default=256, help="the batch of the decode-step breakdown "
                    "(at most --max-num-seqs)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--timeline", action="store_true", help="time every step of the run; print them by kind "
                    "and batch size, with the host's wait for the GPU and the GEMMs alone at their mean tokens")
    ap.add_argument("--trace", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="comma-separated batch sizes: when the running sequences first drop to each (all "
                    "admitted), profile --trace-steps steps of the run on the GPU (time by kernel, idle gaps)")
    ap.add_argument("--trace-steps", type=int, default=8)
    ap.add_argument("--trace-first", type=int, default=0, help="also profile the run's first N steps (the prefills)")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    reqs = load_requests(Path(args.data), args.requests, args.seed)
    prompts, outputs = make_prompts(reqs, config.vocab_size, args.seed), reqs[:, 1]
    print(f"{len(prompts)} requests: {int(reqs[:, 0].sum())} prompt and {int(outputs.sum())} output tokens; "
          f"{'tiny' if args.tiny else 'Llama-3-8B'} shape on {args.device}")
    results = {"glake": run_glake(torch, args, config, prompts, outputs)}
    if args.hf:
        try:
            results["hf"] = run_hf(torch, args, config, prompts, outputs)
        except Exception as e:  # the anchor's API moves between transformers releases: say so, keep glake's
            print(f"HF anchor failed: {type(e).__name__}: {e}")

    rows = [[name, round(r["elapsed_s"], 1), r["output_tokens"], round(r["output_tok_s"]), round(r["total_tok_s"])]
            for name, r in results.items()]
    print_table(f"Offline throughput ({len(prompts)} ShareGPT-length requests, greedy, ignore_eos)",
                ["engine", "time s", "output tokens", "output tok/s", "total tok/s"], rows)
    g = results["glake"]
    if "hf" in results:
        g["over_hf"] = g["output_tok_s"] / results["hf"]["output_tok_s"]
        print(f"\nglake / HF output tok/s: {g['over_hf']:.1f}x")
    if "step_wall_ms" in g:
        keys = ["step_batch", "step_wall_ms", "step_gemm_ms", "step_attention_ms", "step_fused_ms",
                "step_sampling_ms", "step_other_ms", "step_gpu_idle_frac", "gemms_alone_ms", "attention_alone_ms", "step_over_alone"]
        print_table("Decode step at --profile-batch (device ms by kernel class; alone = run by themselves)",
                    keys, [[round(g.get(k, 0.0), 3) if isinstance(g.get(k, 0.0), float) else g.get(k) for k in keys]])
    if "timeline" in g:
        keys = ["kind", "steps", "seconds", "mean_ms", "wait_ms", "mean_seqs", "mean_tokens", "gemms_alone_ms"]
        print_table("The run's steps by kind (wall; wait = the host waiting for the sampled ids; GEMMs alone at "
                    "the mean tokens)", keys, [[round(r[k], 3) if isinstance(r.get(k), float) else r.get(k, "-")
                                              for k in keys] for r in g["timeline"]])
    for tr in g.get("traces", []):
        print_trace(tr)
    if "host_schedule_ms" in g:
        keys = ["host_schedule_ms", "host_reserve_batch_ms", "host_run_ms", "host_sampler_ms", "host_rest_ms"]
        print_table("Host time of that step by phase (ms; rest = waiting for the sampled ids, then bookkeeping)",
                    keys, [[round(g[k], 3) for k in keys]])
    write_json("serve_offline", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
