"""Fixtures of the dedup tests: a broker socket of each test's own, and worker processes."""

from __future__ import annotations

import pytest

from glake.dedup import wire
from tests.dedup.util import Worker, stop_broker


@pytest.fixture
def sock(tmp_path, monkeypatch):
    """A broker socket of this test's own (the broker starts on demand and is stopped afterwards)."""
    d = tmp_path / "rt"
    d.mkdir(mode=0o700)
    path = str(d / "dedup.sock")
    monkeypatch.setenv(wire.SOCKET_ENV, path)
    monkeypatch.setenv("GLAKE_BACKEND", "host")
    yield path
    stop_broker(path)


@pytest.fixture
def workers():
    """``make(n, env)``: n worker processes, killed at the end if still running."""
    made = []

    def make(n=1, env=None):
        ws = [Worker(env) for _ in range(n)]
        made.extend(ws)
        return ws
    yield make
    for w in made:
        if w.proc.poll() is None:
            w.kill()
