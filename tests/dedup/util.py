"""What the dedup tests share: worker processes (worker.py), the broker's figures, stopping a broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from glake.dedup import client
from glake.dedup.client import BrokerClient

WORKER = str(Path(__file__).with_name("worker.py"))
ROOT = str(Path(__file__).resolve().parents[2])
CHUNKS = 6


def stop_broker(path: str) -> None:
    """Stops the broker on `path`, if one runs, and waits for its socket to go."""
    client.stop_broker(path)
    deadline = time.monotonic() + 10
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def broker(path: str) -> dict:
    return BrokerClient(path, autostart=False).stats()


class Worker:
    """tests/dedup/worker.py in a process of its own."""

    def __init__(self, env=None) -> None:
        self.proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, PYTHONPATH=ROOT, DEDUP_TEST_CHUNKS=str(CHUNKS),
                                                         **(env or {})))

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"worker died ({self.proc.wait(10)}) on {line!r}")
        return json.loads(out)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(20)
