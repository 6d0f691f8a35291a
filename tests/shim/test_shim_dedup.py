"""The shim's dedup hint (GLAKE_DEDUP=1, glake_shim_dedup_share in csrc/shim/glake_shim.h) on the fake
libcuda: processes that load the same bytes share their chunks through the broker and read them back
intact; a chunk with one byte different stays private; forced digest collisions never share; a killed
exporter leaves the importers reading; a write to a shared chunk faults; a freed buffer's memory is
private and writable again; a suspend keeps shared chunks without copying them; without GLAKE_DEDUP the
call says it is off."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from tests.dedup.util import broker, stop_broker
from tests.shim.conftest import GLAKE, base_env
from tests.shim.test_shim import allocator_counters, glake_cli, wait_for

TIMEOUT = 60
MIB = 16  # 8 chunks of 2 MiB


@pytest.fixture
def env(fake_dir, runtime_dir, tmp_path):
    sock = str(tmp_path / "dedup.sock")
    e = base_env(fake_dir, runtime_dir, GLAKE_REAL_LIBCUDA=str(fake_dir / "libcuda.so.1"), GLAKE_DEDUP="1",
                 GLAKE_DEDUP_SOCKET=sock)
    yield e
    stop_broker(sock)


class Worker:
    """One dedup_weights process under `glake run --shim`, alive until told to exit."""

    def __init__(self, program: Path, env: Dict[str, str], seed: int = 7, differ: int = -1, mib: int = MIB) -> None:
        args = [str(program), str(mib), str(seed)] + ([str(differ)] if differ >= 0 else [])
        self.proc = subprocess.Popen([*GLAKE, "run", "--shim", "--", *args], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.r = self.read_until("intact")

    def read_until(self, tag: str) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"exited {self.proc.wait()}: {self.proc.stderr.read()}")
            if line.startswith("R "):
                key, *rest = line[2:].split()
                out[key] = rest
                if key == tag:
                    return out

    def ask(self, cmd: str, tag: str) -> Dict[str, List[str]]:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read_until(tag)

    def close(self) -> str:
        """Ends the process; returns what it said on stderr."""
        if self.proc.poll() is None:
            try:
                return self.proc.communicate("exit\n", timeout=TIMEOUT)[1]
            except (subprocess.TimeoutExpired, BrokenPipeError, ValueError):
                self.proc.kill()
        return self.proc.communicate()[1]


def shared(w: Worker) -> int:
    code, nbytes = w.r["share"]
    assert code == "0", w.r
    return int(nbytes)


def saved(w: Worker) -> int:
    return int(w.r["saved"][0])


@pytest.fixture
def workers():
    made: List[Worker] = []
    yield made
    for w in made:
        w.close()


def test_processes_with_the_same_bytes_share_them(shim, dedup_program, env, workers):
    for _ in range(3):
        workers.append(Worker(dedup_program, env))
    first, *rest = workers
    assert shared(first) == MIB << 20 and saved(first) == 0  # its chunks became the canonical ones
    for w in rest:
        assert shared(w) == MIB << 20 and saved(w) == MIB << 20, w.r
    for w in workers:
        assert w.r["intact"] == ["1"]
        assert w.ask("check", "intact")["intact"] == ["1"]
    st = broker(env["GLAKE_DEDUP_SOCKET"])
    assert st["chunks"] == MIB // 2 and st["holds"] == 3 * (MIB // 2)


def test_one_byte_different_keeps_that_chunk_private(shim, dedup_program, env, workers):
    workers.append(Worker(dedup_program, env))
    workers.append(Worker(dedup_program, env, differ=3))
    assert saved(workers[1]) == (MIB - 2) << 20  # 7 of 8 chunks mapped from the first process
    assert shared(workers[1]) == MIB << 20  # its own chunk 3 became a canonical one
    assert all(w.ask("check", "intact")["intact"] == ["1"] for w in workers)


def test_forced_collisions_never_share_unequal_bytes(shim, dedup_program, env, workers):
    env = dict(env, GLAKE_DEDUP_TEST_COLLIDE="1")  # every digest the same
    workers.append(Worker(dedup_program, env, seed=1))
    workers.append(Worker(dedup_program, env, seed=2))
    # One key for every chunk: the first process's chunk 0 became the canonical one and its other 7
    # compared unequal with it; the second's 8 all compared unequal with it: nothing else shared.
    assert workers[0].r["share"] == ["0", str(2 << 20)] and workers[1].r["share"] == ["0", "0"]
    assert saved(workers[0]) == 0 and saved(workers[1]) == 0
    assert workers[1].r["intact"] == ["1"] and workers[0].ask("check", "intact")["intact"] == ["1"]


def test_a_killed_exporter_leaves_the_importer_reading(shim, dedup_program, env, workers):
    workers.append(Worker(dedup_program, env))
    workers.append(Worker(dedup_program, env))
    workers[0].proc.kill()
    workers[0].proc.wait()
    assert workers[1].ask("check", "intact")["intact"] == ["1"]
    third = Worker(dedup_program, env)  # the second process's holds keep the chunks in the broker
    workers.append(third)
    assert saved(third) == MIB << 20 and third.r["intact"] == ["1"]


def test_a_write_to_a_shared_chunk_faults_and_changes_nobody(shim, dedup_program, env, workers):
    workers.append(Worker(dedup_program, env))
    writer = Worker(dedup_program, env)
    workers.append(writer)
    writer.proc.stdin.write("write\n")
    writer.proc.stdin.flush()
    assert writer.proc.wait(timeout=TIMEOUT) == -signal.SIGSEGV  # the fake maps shared chunks PROT_READ
    assert workers[0].ask("check", "intact")["intact"] == ["1"]


def test_freed_memory_is_private_and_writable_again(shim, dedup_program, env, workers):
    workers.append(Worker(dedup_program, env))
    second = Worker(dedup_program, env)
    workers.append(second)
    r = second.ask("free", "after_free")
    assert r["rewrite"] == ["1"] and r["after_free"] == ["0", "0"]  # holds given back with the buffer
    assert workers[0].ask("check", "intact")["intact"] == ["1"]  # the canonical bytes are untouched
    st = broker(env["GLAKE_DEDUP_SOCKET"])
    assert st["holds"] == MIB // 2  # only the first process holds the chunks now


def test_suspend_keeps_shared_chunks_without_copying_them(shim, dedup_program, env, workers):
    workers.append(Worker(dedup_program, env))
    second = Worker(dedup_program, env)
    workers.append(second)
    pid = second.proc.pid  # glake run execs the program: same pid

    sus = glake_cli(env, "suspend", str(pid))
    assert sus.returncode == 0 and "suspended device(s) 0" in sus.stdout, sus.stdout + sus.stderr
    c = wait_for(lambda: (c := allocator_counters(pid, env))["suspended"] == 1 and c)
    assert c["suspended_host_bytes"] == 0 and c["shared_bytes"] == MIB << 20  # nothing copied
    res = glake_cli(env, "resume", str(pid))
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: allocator_counters(pid, env)["suspended"] == 0)
    assert second.ask("check", "intact")["intact"] == ["1"]
    st = broker(env["GLAKE_DEDUP_SOCKET"])
    assert st["holds"] == 2 * (MIB // 2)


def test_without_glake_dedup_the_hint_says_it_is_off(shim, dedup_program, env, workers):
    env = dict(env)
    del env["GLAKE_DEDUP"]
    w = Worker(dedup_program, env)
    workers.append(w)
    assert w.r["share"][0] == str(801) and "GLAKE_DEDUP=1" in " ".join(w.r["error"])  # CUDA_ERROR_NOT_SUPPORTED
    assert w.r["intact"] == ["1"]


def test_without_the_shim_the_lookup_finds_nothing(dedup_program, fake_dir, runtime_dir):
    env = base_env(fake_dir, runtime_dir, LD_LIBRARY_PATH=str(fake_dir))
    out = subprocess.run([str(dedup_program), "4", "1"], env=env, input="exit\n", capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert "R share none 0" in out.stdout and "R intact 1" in out.stdout
