"""Dedup under the libcuda shim: N driver-API processes with the same weights share them.

Each worker is tests/shim/programs/dedup_weights.cpp under ``glake run --shim`` with GLAKE_DEDUP=1:
it allocates ``--mib`` MiB with cuMemAlloc, writes the same seeded bytes as every other worker, and
calls ``glake_shim_dedup_share`` on them (csrc/shim/glake_shim.h: each 2 MiB chunk digested on the
GPU, looked up in the broker, compared byte by byte, then mapped read-only in place of its own). The
workers start one after another and stay alive while the device memory in use is read
(cudaMemGetInfo, less what was in use before the first worker). Columns: device memory with N alive;
the part that is CUDA contexts (N times what the first worker's context took); the rest against one
process's weights (measured in the same run); the slowest share call and its throughput. The issue's
target for the Python path (4 processes <= 1.1x one process's weight memory) is the yardstick.

    python3 benchmarks/shim_dedup.py [--procs 1,2,4] [--mib 4096]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def build_program(out_dir: str) -> str:
    """dedup_weights, linked against the real libcuda.so.1 (the shim replaces it at run time)."""
    from glake.shim import find_real_libcuda

    cxx = shutil.which(os.environ.get("CXX", "g++")) or "c++"
    include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    out = os.path.join(out_dir, "dedup_weights")
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{include}", f"-I{ROOT / 'csrc' / 'shim'}",
                    str(ROOT / "tests" / "shim" / "programs" / "dedup_weights.cpp"), "-o", out, "-Wl,--no-as-needed",
                    f"-L{os.path.dirname(find_real_libcuda())}", "-l:libcuda.so.1", "-ldl"], check=True)
    return out


def free_bytes() -> int:
    import torch

    return torch.cuda.mem_get_info()[0]


class Worker:
    def __init__(self, program: str, mib: int, env: dict) -> None:
        glake = [sys.executable, "-m", "glake.cli"]
        self.proc = subprocess.Popen([*glake, "run", "--shim", "--", program, str(mib), "7"], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.r = self.read_until("intact")
        if self.r["share"][0] != "0" or self.r["intact"] != ["1"]:
            raise RuntimeError(f"worker failed: {self.r}")

    def read_until(self, tag: str) -> dict:
        out = {}
        for line in self.proc.stdout:
            if line.startswith("R "):
                key, *rest = line[2:].split()
                out[key] = rest
                if key == tag:
                    return out
        raise RuntimeError(f"worker exited {self.proc.wait()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("exit\n", timeout=120)


def run_n(n: int, program: str, mib: int, env: dict) -> dict:
    time.sleep(1.0)  # the last run's chunks: freed once their holders are gone
    base = free_bytes()
    workers = []
    try:
        for _ in range(n):
            workers.append(Worker(program, mib, env))
        time.sleep(0.5)
        used = base - free_bytes()
    finally:
        for w in workers:
            w.close()
    ctx = base - int(workers[0].r["mem_before"][0])
    share_s = [int(w.r["share_us"][0]) / 1e6 for w in workers]
    return {"procs": n, "used_bytes": used, "context_bytes": n * ctx, "weight_bytes_held": used - n * ctx,
            "share_s": share_s, "saved_bytes": [int(w.r["saved"][0]) for w in workers]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--mib", type=int, default=4096, help="weights per process (MiB)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="glake-shim-dedup-")
    program = build_program(tmp)
    sock = os.path.join(tmp, "dedup.sock")
    env = dict(os.environ, GLAKE_DEDUP="1", GLAKE_DEDUP_SOCKET=sock)
    runs = []
    try:
        for n in args.procs.split(","):
            runs.append(run_n(int(n), program, args.mib, env))
            r = runs[-1]
            print(f"{n} processes: {r['used_bytes'] / GiB:.2f} GiB in use, of it {r['weight_bytes_held'] / GiB:.2f} GiB "
                  f"weights; share {max(r['share_s']):.2f} s (slowest)", flush=True)
    finally:
        from glake.dedup.client import stop_broker

        stop_broker(sock)
    one = next((r["weight_bytes_held"] for r in runs if r["procs"] == 1), 0)
    weights = args.mib << 20
    rows = [[r["procs"], round(r["used_bytes"] / GiB, 2), round(r["context_bytes"] / GiB, 2),
             round(r["weight_bytes_held"] / GiB, 2), round(r["weight_bytes_held"] / one, 3) if one else "",
             round(max(r["share_s"]), 3), round(weights / 1e9 / max(r["share_s"]), 1),
             sum(r["saved_bytes"]) >> 20] for r in runs]
    print_table(f"Shim dedup: N driver-API processes with the same {weights / GiB:.1f} GiB under glake run --shim "
                "(GLAKE_DEDUP=1); device memory in use with all N alive",
                ["procs", "device GiB", "contexts GiB", "weights GiB", "weights vs 1 process", "share s (slowest)",
                 "share GB/s (slowest)", "saved MiB"], rows)
    write_json("shim_dedup", {"args": vars(args), "weight_bytes": weights, "runs": runs})


if __name__ == "__main__":
    main()
