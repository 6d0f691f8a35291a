"""What a VMM call costs by physical chunk size (GPU only): cuMemCreate, cuMemMap, the first
cuMemSetAccess, the same on a second mapping of the same chunks (a stitch), cuMemUnmap, cuMemRelease,
per GiB, for chunks of 2 MiB to 2 GiB; and whether cuMemMap takes an offset into a chunk.

    python3 benchmarks/vmm_chunk_size.py        # compiles vmm_chunk_size.cpp with g++ -lcuda, runs it
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

SRC = Path(__file__).resolve().with_suffix(".cpp")


def main() -> None:
    exe = Path(tempfile.mkdtemp()) / "vmm_chunk_size"
    subprocess.run(["g++", "-O2", "-I/usr/local/cuda/include", str(SRC), "-lcuda", "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    offset = lines[0].split()[1]
    cols = ["create", "map", "set_access", "set_access_2nd_va", "unmap", "release"]
    rows = []
    for line in lines[2:]:
        v = line.split()
        rows.append([int(v[0])] + [float(x) for x in v[1:7]])
    print_table(f"microseconds per GiB by chunk size (cuMemMap with an offset into a chunk: {offset})",
                ["chunk MiB", *cols], rows)
    write_json("vmm_chunk_size", {"offset_map": offset, "columns": cols, "rows": rows})


if __name__ == "__main__":
    main()
