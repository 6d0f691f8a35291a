"""Fixtures of the stats tests: a private runtime directory, and real servers in child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child_server.py")


@pytest.fixture(scope="session", autouse=True)
def private_runtime_dir() -> Iterator[str]:
    """Every stats test (and every child it starts) uses its own runtime directory, so the tests
    neither see nor disturb other glake processes of the user. Short path: unix sockets allow 107 bytes."""
    base = tempfile.mkdtemp(prefix="glk-")
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = base
    yield base
    if old is None:
        del os.environ["XDG_RUNTIME_DIR"]
    else:
        os.environ["XDG_RUNTIME_DIR"] = old


class Child:
    """A glake process serving stats (tests/stats/child_server.py)."""

    def __init__(self, *args: str, lifetime: float = 180.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, CHILD, "--lifetime", str(lifetime), *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # the child prints one line once it serves
        if not line:
            err = self.proc.stderr.read()
            raise RuntimeError(f"child server failed to start: {err}")
        self.info: Dict[str, Any] = json.loads(line)
        self.pid: int = self.info["pid"]
        self.addresses: List[str] = self.info["addresses"]
        self.socket: str = self.addresses[0][len("unix:"):]

    @property
    def tcp(self) -> Optional[str]:
        return next((a for a in self.addresses if not a.startswith("unix:")), None)

    def stop(self, timeout: float = 20.0) -> int:
        """Close its stdin (it then stops serving and exits); returns its exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def child() -> Iterator[Child]:
    """One serving child with the fragmented layout, shared by a module's tests."""
    pytest.importorskip("grpc")
    c = Child()
    yield c
    c.stop()


def wait_gone(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(path):
            return True
        time.sleep(0.05)
    return False
