"""`glake suspend PID` / `glake resume PID`: the real commands against a real child process whose
process-wide allocator holds data; over TCP the control service refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT
from .test_cli import run_cli

CHILD = r"""
import json, sys, ctypes
import numpy as np
import glake, glake.stats
from glake import _C
g = _C.gmlake_global(0)
n = 6 << 20
p = g.malloc(n, 0)
view = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(p))
view[:] = np.arange(n, dtype=np.uint32).astype(np.uint8)
server = glake.stats.serve(sys.argv[1] if len(sys.argv) > 1 else None)
print(json.dumps({"pid": server.pid, "addresses": server.addresses}), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "state":
        st = g.stats()
        print(json.dumps({"suspended": st["suspended"], "physical": _C.stats("host")["physical_bytes.current"]}), flush=True)
    elif cmd == "check":
        ok = bool(np.array_equal(view, np.arange(n, dtype=np.uint32).astype(np.uint8)))
        print(json.dumps({"intact": ok}), flush=True)
"""


@pytest.fixture()
def holder():
    pytest.importorskip("grpc")
    env = dict(os.environ, GLAKE_BACKEND="host",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "127.0.0.1:0"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline() or "null") or pytest.fail(proc.stderr.read())

    def ask(cmd: str) -> dict:
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    yield info, ask
    proc.stdin.close()
    proc.wait(20)


def test_suspend_and_resume_from_outside(holder):
    info, ask = holder
    pid = str(info["pid"])
    before = ask("state")
    assert before["suspended"] == 0 and before["physical"] >= 6 << 20
    code, out, err = run_cli("suspend", pid)
    assert code == 0, err
    assert "suspended device(s) 0" in out and "6.00 MiB of live data in host memory" in out, out
    now = ask("state")
    assert now["suspended"] == 1 and now["physical"] == 0, now
    code, out, err = run_cli("suspend", pid)  # already suspended: nothing to do, not an error
    assert code == 0 and "none (nothing to do)" in out, (out, err)
    code, out, err = run_cli("resume", pid)
    assert code == 0 and "resumed device(s) 0" in out, (out, err)
    assert ask("state")["suspended"] == 0 and ask("check")["intact"]


def test_control_is_refused_over_tcp(holder):
    info, _ = holder
    tcp = next(a for a in info["addresses"] if not a.startswith("unix:"))
    code, out, err = run_cli("suspend", tcp)
    assert code == 1 and "PERMISSION_DENIED" in err and "unix socket only" in err, (out, err)
