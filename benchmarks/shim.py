"""The libcuda shim on a GPU, each measurement with and without `glake run --shim` in the same run:

1. cuMemAlloc + cuMemFree latency by size (benchmarks/shim_bench.cpp, median of 200 pairs);
2. device memory in use at the peak of a fragmenting allocation trace (same program, cuMemGetInfo
   after every allocation) against the peak of the live bytes;
3. JAX training steps under XLA's platform allocator (XLA_PYTHON_CLIENT_ALLOCATOR=platform: every
   buffer is a cuMemAlloc/cuMemFree), their median time and the peak device memory in use (sampled):
   `mlp`, 4 wide layers with SGD, where the GEMMs dominate and few buffers are made; `adam`, 32 layers
   of 1024 with Adam, where each step makes about 200 output buffers (parameters and both moments)
   and frees the last step's, as the optimizer step of a real model does.

Targets (issue 14): malloc/free >= 10x faster than the driver's at >= 2 MiB; the trace's peak
<= 1.05x plain cudaMalloc's; the JAX platform step >= 2x faster than without the shim.

    python3 benchmarks/shim.py [--pairs 200] [--trace-steps 2000] [--jax-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZES = [4 << 10, 64 << 10, 1 << 20, 2 << 20, 8 << 20, 32 << 20, 128 << 20]
MiB = 1 << 20

JAX_STEP = r"""
import ctypes, json, os, sys, threading, time
import jax, jax.numpy as jnp

def handshake(word):
    # under the shim the benchmark reads this process's stats page around the timed steps
    if os.environ.get("SHIM_BENCH_HANDSHAKE"):
        print(word, os.getpid(), flush=True)
        sys.stdin.readline()

cuda = ctypes.CDLL("libcuda.so.1")
peak = [0]
stop = threading.Event()

def sample():
    # device memory in use (total - free), from this process's libcuda (the shim's truthful answer under it)
    cuda.cuInit(0)
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    cuda.cuCtxSetCurrent(ctx)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    while not stop.is_set():
        cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
        peak[0] = max(peak[0], total.value - free.value)
        time.sleep(0.0005)

def init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (a, b)) * (1.0 / a) ** 0.5, jnp.zeros(b)) for k, a, b in zip(keys, sizes, sizes[1:])]

def loss(params, x, y):
    for w, b in params[:-1]:
        x = jax.nn.gelu(x @ w + b)
    w, b = params[-1]
    return jnp.mean((x @ w + b - y) ** 2)

MODEL = "MODEL_NAME"
if MODEL == "mlp":  # few, large buffers: 4 layers of 2048-4096, batch 4096, SGD (the GEMMs dominate)
    sizes, batch = [2048, 4096, 4096, 4096, 1024], 4096

    @jax.jit
    def step(state, x, y):
        params = state
        l, g = jax.value_and_grad(loss)(params, x, y)
        return [(w - 1e-3 * gw, b - 1e-3 * gb) for (w, b), (gw, gb) in zip(params, g)], l

    def start(params):
        return params
else:  # "adam": many buffers, as a real model has: 32 layers of 1024, batch 512, Adam (params, m, v)
    sizes, batch = [1024] * 33, 512
    b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8

    @jax.jit
    def step(state, x, y):
        params, m, v, t = state
        l, g = jax.value_and_grad(loss)(params, x, y)
        t = t + 1
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        corr = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        params = jax.tree_util.tree_map(lambda p, m, v: p - corr * m / (jnp.sqrt(v) + eps), params, m, v)
        return (params, m, v, t), l

    def start(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return params, zeros, jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.float32)

state = start(init(jax.random.PRNGKey(0), sizes))
x = jax.random.normal(jax.random.PRNGKey(1), (batch, sizes[0]))
y = jax.random.normal(jax.random.PRNGKey(2), (batch, sizes[-1]))
t = threading.Thread(target=sample, daemon=True)
for i in range(3):
    state, l = step(state, x, y)
l.block_until_ready()
t.start()
handshake("BEFORE")
times = []
for i in range(STEPS):
    t0 = time.perf_counter()
    state, l = step(state, x, y)
    l.block_until_ready()
    times.append(time.perf_counter() - t0)
handshake("AFTER")
stop.set()
t.join()
times.sort()
print(json.dumps({"step_ms": times[len(times) // 2] * 1e3, "peak_used": peak[0], "loss": float(l),
                  "jax": jax.__version__}))
"""


def glake_cmd() -> List[str]:
    script = os.path.join(os.path.dirname(sys.executable), "glake")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "glake.cli"]


def run(cmd: List[str], shim: bool, env: Dict[str, str], timeout: int = 300) -> str:
    full = [*glake_cmd(), "run", "--shim", "--", *cmd] if shim else cmd
    out = subprocess.run(full, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


SHIM_COUNTERS = ("alloc_calls", "free_calls", "free_deferred", "free_syncs", "passthrough_allocs",
                 "passthrough_frees", "attribute_answers")
ALLOC_COUNTERS = ("num_segments_created", "num_segments_released", "num_stitches", "num_sync_all_streams",
                  "num_alloc_retries")


def run_jax_under_shim(code: str, env: Dict[str, str], timeout: int = 300) -> Dict[str, object]:
    """The JAX step script under `glake run --shim`, with the shim's counters over its timed steps
    (read from the process's stats page before and after them)."""
    import time

    from glake.stats import shim_page

    err_file = tempfile.TemporaryFile(mode="w+")  # a pipe left unread could fill and stall the child
    proc = subprocess.Popen([*glake_cmd(), "run", "--shim", "--", sys.executable, "-c", code],
                            env=dict(env, SHIM_BENCH_HANDSHAKE="1"), text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err_file)

    def failed(why: str) -> RuntimeError:
        proc.kill()
        proc.wait()
        err_file.seek(0)
        return RuntimeError(f"JAX step under the shim: {why}\n{err_file.read()[-3000:]}")

    try:
        seen = {}
        for word in ("BEFORE", "AFTER"):
            line = proc.stdout.readline()
            while line and not line.startswith(word):
                line = proc.stdout.readline()
            if not line:
                raise failed(f"the script ended before saying {word}")
            time.sleep(0.2)  # the page is republished at most every 50 ms
            page = shim_page.read_pid(int(line.split()[1]))
            if page is None:
                raise failed("no stats page for the shimmed process")
            counters = {}
            for sec in page["sections"]:  # the shim's, then device 0's allocator's
                if sec["name"] == "shim" or (sec["name"] == "allocator" and sec["device"] == 0):
                    counters.update(sec["counters"])
            seen[word] = {k: counters.get(k, 0) for k in SHIM_COUNTERS + ALLOC_COUNTERS}
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise failed(f"exit status {proc.returncode}")
    res = json.loads(out.splitlines()[-1])
    res["shim_counters"] = {k: seen["AFTER"][k] - seen["BEFORE"][k] for k in SHIM_COUNTERS + ALLOC_COUNTERS}
    return res


def build(tmp: str) -> str:
    from glake.shim import find_real_libcuda

    libdir = os.path.dirname(find_real_libcuda())
    exe = os.path.join(tmp, "shim_bench")
    cuda_inc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    subprocess.run(["g++", "-std=c++17", "-O2", f"-I{cuda_inc}", str(HERE / "shim_bench.cpp"), "-o", exe,
                    f"-L{libdir}", "-l:libcuda.so.1"], check=True)
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--trace-steps", type=int, default=2000)
    ap.add_argument("--trace-seeds", default="0,1,2")
    ap.add_argument("--jax-steps", type=int, default=20)
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--jax-models", default="mlp,adam",
                    help="mlp: 4 wide layers, SGD (the GEMMs dominate); adam: 32 layers of 1024 with Adam "
                         "(about 200 buffers a step, as a real model's optimizer makes)")
    ap.add_argument("--only-jax", action="store_true", help="skip the latency and trace parts")
    ap.add_argument("--jax-allocator", default="platform",
                    help="XLA_PYTHON_CLIENT_ALLOCATOR for the JAX steps: platform (the issue's), or address "
                         "(newer XLA: where platform became BFC-backed, the synchronous pass-through)")
    args = ap.parse_args()
    unknown = set(args.jax_models.split(",")) - {"mlp", "adam"}
    if unknown:
        ap.error(f"--jax-models: unknown {', '.join(sorted(unknown))} (mlp, adam)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLAKE_ALLOC_CONF")}
    results: Dict[str, object] = {}
    if not args.only_jax:
        with tempfile.TemporaryDirectory() as tmp:
            exe = build(tmp)
            rows = []
            for size in SIZES:
                us = {}
                for shim in (False, True):
                    line = run([exe, "latency", str(size), str(args.pairs)], shim, env).split()
                    us[shim] = float(line[2])
                rows.append([size, us[False], us[True], us[False] / us[True]])
            results["latency"] = [dict(zip(["bytes", "driver_us", "shim_us", "speedup"], r)) for r in rows]
            print_table("cuMemAlloc + cuMemFree, median us per pair", ["bytes", "driver", "shim", "driver / shim"],
                        [[r[0], round(r[1], 2), round(r[2], 2), round(r[3], 1)] for r in rows])
            rows = []
            for seed in args.trace_seeds.split(","):
                peak = {}
                for shim in (False, True):
                    _, used, live = run([exe, "trace", seed, str(args.trace_steps)], shim, env).split()
                    peak[shim] = int(used)
                rows.append([int(seed), int(live) / MiB, peak[False] / MiB, peak[True] / MiB,
                             peak[True] / max(peak[False], 1)])
            results["trace"] = [dict(zip(["seed", "peak_live_mib", "driver_peak_mib", "shim_peak_mib", "ratio"], r))
                                for r in rows]
            print_table(f"Fragmenting trace ({args.trace_steps} frees+allocs): peak device memory in use, MiB",
                        ["seed", "peak live", "driver", "shim", "shim / driver"],
                        [[r[0], round(r[1]), round(r[2]), round(r[3]), round(r[4], 3)] for r in rows])
    if not args.no_jax:
        jenv = dict(env, XLA_PYTHON_CLIENT_ALLOCATOR=args.jax_allocator, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        results["jax"], rows = {}, []
        for model in args.jax_models.split(","):
            code = JAX_STEP.replace("STEPS", str(args.jax_steps)).replace("MODEL_NAME", model)
            res = {False: json.loads(run([sys.executable, "-c", code], False, jenv).splitlines()[-1]),
                   True: run_jax_under_shim(code, jenv)}
            per_step = {k: v / args.jax_steps for k, v in res[True]["shim_counters"].items()}
            speedup = res[False]["step_ms"] / res[True]["step_ms"]
            results["jax"][model] = {"driver": res[False], "shim": res[True], "speedup": speedup,
                                     "shim_calls_per_step": per_step}
            rows.append([model, round(res[False]["step_ms"], 2), round(res[True]["step_ms"], 2), round(speedup, 2),
                         round(res[False]["peak_used"] / MiB), round(res[True]["peak_used"] / MiB),
                         round(res[False]["loss"], 6), round(res[True]["loss"], 6),
                         *[round(per_step[k], 1) for k in SHIM_COUNTERS[:5]]])
        for model in results["jax"]:
            print(f"{model}: under the shim, per timed step: " + ", ".join(
                f"{k} {v:.1f}" for k, v in results["jax"][model]["shim_calls_per_step"].items()))
        print_table(f"JAX training step, XLA_PYTHON_CLIENT_ALLOCATOR={args.jax_allocator} (median of steps; the shim's "
                    "calls per step over the timed steps)",
                    ["model", "driver ms", "shim ms", "speed-up", "driver peak MiB", "shim peak MiB",
                     "driver loss", "shim loss", *SHIM_COUNTERS[:5]], rows)
    write_json("shim", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
