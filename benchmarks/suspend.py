"""Suspend and resume of glake's memory (GPU): time each way and device memory left, by size.

For each size, a fresh process installs glake.torch, fills that many bytes of tensors (1 GiB each,
random data), and times glake.suspend() and glake.resume() (device synchronised around each), reads
cudaMemGetInfo before, while suspended and after, and checks one tensor's checksum across the pair.
Targets (issue 16): >= 40 GB/s each way, device memory left <= 0.1 GiB plus what glake does not manage
(the CUDA context, torch's kernels).

    python3 benchmarks/suspend.py [--sizes-gib 1,16,80]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

GiB = 1 << 30


def worker(gib: int) -> dict:
    import glake
    import glake.torch

    glake.torch.install()
    import torch

    base_free, total = torch.cuda.mem_get_info()
    xs = [torch.randn(GiB // 4, device="cuda") for _ in range(gib)]
    want = float(xs[-1].double().sum())
    torch.cuda.synchronize()
    held_free, _ = torch.cuda.mem_get_info()
    t0 = time.perf_counter()
    glake.suspend()
    t1 = time.perf_counter()
    suspended_free, _ = torch.cuda.mem_get_info()
    t2 = time.perf_counter()
    glake.resume()
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    got = float(xs[-1].double().sum())
    return {"gib": gib, "suspend_s": t1 - t0, "resume_s": t3 - t2, "base_free": base_free, "held_free": held_free,
            "suspended_free": suspended_free, "total": total, "intact": got == want}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gib", default="1,16,80")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker)))
        return
    rows, results = [], []
    for gib in (int(x) for x in args.sizes_gib.split(",") if x):
        proc = subprocess.run([sys.executable, __file__, "--worker", str(gib)], capture_output=True, text=True,
                              timeout=1200)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            rows.append([gib, "error", "", "", "", "", ""])
            print(f"{gib} GiB failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
            continue
        r = json.loads(line[0][7:])
        results.append(r)
        left = (r["base_free"] - r["suspended_free"]) / GiB  # what the process still holds beyond its start
        rows.append([gib, round(r["suspend_s"], 3), round(gib * GiB / r["suspend_s"] / 1e9, 1), round(r["resume_s"], 3),
                     round(gib * GiB / r["resume_s"] / 1e9, 1), round(left, 3), r["intact"]])
    print_table("glake.suspend / glake.resume (device synchronised around each)",
                ["GiB", "suspend s", "suspend GB/s", "resume s", "resume GB/s", "GiB left vs start", "data intact"], rows)
    write_json("suspend", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
