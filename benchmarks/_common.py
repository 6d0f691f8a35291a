"""Helpers shared by the benchmark scripts: machine description, table printing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

RESULTS_DIR = Path(os.environ.get("GLAKE_BENCH_DIR", Path(__file__).resolve().parent / "results"))


def machine() -> Dict[str, Any]:
    """What the numbers were measured on."""
    info: Dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


class LineWorker:
    """A measuring subprocess driven one line at a time, pinned to ``cpus``: once set up it prints
    ``READY``, then answers each request line with ``RESULT <json>`` (other output lines are skipped).
    Its stderr goes to a file, not a pipe, so that a chatty worker never blocks on it."""

    def __init__(self, name: str, cmd: List[str], cpus: set) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.kill()
                self.log.seek(0)
                raise SystemExit(f"{self.name} worker failed:\n{self.log.read()[-4000:]}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def ask(self, request: str) -> Any:
        """Sends one request line; returns its answer, parsed."""
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def print_table(title: str, header: Sequence[str], rows: List[Sequence[Any]]) -> None:
    """Print one aligned text table (Markdown-compatible)."""
    cells = [[str(h) for h in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")


def write_json(name: str, payload: Dict[str, Any]) -> Path:
    """Write results/<name>.json (or $GLAKE_BENCH_DIR) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
    return path
