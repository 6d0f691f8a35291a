"""The libcuda shim (csrc/shim, docs/shim.md) on the fake libcuda: a driver-API program gives the same
results with and without it, its allocations go to glake (and glake's own calls reach the fake, never
the shim), the stats page shows them while it runs, and cuGetProcAddress, IPC, fork and threads behave
as documented."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.shim.conftest import CUDA_INCLUDE, GLAKE, base_env

TIMEOUT = 60


def run_plain(program: Path, mode: str, fake_dir: Path, runtime_dir: Path, **extra: str) -> subprocess.CompletedProcess:
    """The program against the fake alone (the baseline)."""
    env = base_env(fake_dir, runtime_dir, LD_LIBRARY_PATH=str(fake_dir), **extra)
    return subprocess.run([str(program), mode], env=env, capture_output=True, text=True, timeout=TIMEOUT)


def run_shim(program: Path, mode: str, fake_dir: Path, runtime_dir: Path, *glake_args: str,
             **extra: str) -> subprocess.CompletedProcess:
    """The program under `glake run --shim`, the fake as the real driver."""
    env = base_env(fake_dir, runtime_dir, **{"GLAKE_REAL_LIBCUDA": str(fake_dir / "libcuda.so.1"), **extra})
    return subprocess.run([*GLAKE, "run", "--shim", *glake_args, "--", str(program), mode], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def lines(out: str, tag: str) -> list:
    return [line for line in out.splitlines() if line.startswith(tag + " ")]


def counters(out: str) -> dict:
    return {k: int(v) for k, v in (line[2:].split() for line in lines(out, "C"))}


def test_shim_has_the_driver_soname(shim):
    out = subprocess.run(["readelf", "-d", str(shim)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("no readelf")
    assert "Library soname: [libcuda.so.1]" in out.stdout


def cuda_h_names() -> set:
    """Every name a program can link against: cuda.h's declared names and what its macros make of them."""
    text = (CUDA_INCLUDE / "cuda.h").read_text()
    names = set(re.findall(r"CUresult\s+CUDAAPI\s+(cu\w+)\s*\(", text))
    for _, target in re.findall(r"#define\s+(cu\w+)\s+(\S.*)", text):
        m = re.match(r"__CUDA_API_PT(DS|SZ)\((cu\w+)\)", target.strip())
        if m:
            names |= {m.group(2), f"{m.group(2)}_pt{m.group(1).lower()}"}
        elif re.fullmatch(r"cu\w+", target.strip()):
            names.add(target.strip())
    return names - set(re.findall(r"static\s+inline\s+CUresult\s+(cu\w+)", text))  # header-only wrappers


def test_every_cuda_h_entry_point_is_exported(shim, tmp_path):
    names = sorted(cuda_h_names())
    assert len(names) > 600 and "cuMemAlloc_v2" in names and "cuMemcpyHtoD_v2_ptds" in names
    (tmp_path / "names.json").write_text(json.dumps(names))
    # dlsym in a child: loading the shim here would register its fork handlers in pytest.
    code = ("import ctypes, json, sys\nlib = ctypes.CDLL(sys.argv[1])\nnames = json.load(open(sys.argv[2]))\n"
            "print(json.dumps([n for n in names if not hasattr(lib, n)]))")
    out = subprocess.run([sys.executable, "-c", code, str(shim), str(tmp_path / "names.json")], capture_output=True,
                         text=True, timeout=TIMEOUT, env={**os.environ, "GLAKE_REAL_LIBCUDA": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_driver_program_gives_the_same_results_under_the_shim(shim, driver_program, fake_dir, runtime_dir):
    plain = run_plain(driver_program, "basic", fake_dir, runtime_dir)
    shimmed = run_shim(driver_program, "basic", fake_dir, runtime_dir)
    assert plain.returncode == 0, plain.stderr
    assert shimmed.returncode == 0, shimmed.stdout + shimmed.stderr
    assert lines(shimmed.stdout, "R") == lines(plain.stdout, "R")
    assert "R contents_ok 1" in plain.stdout and "R range_ok 1" in plain.stdout and "R attr_ok 1" in plain.stdout
    base, glake_run = counters(plain.stdout), counters(shimmed.stdout)
    assert base["fake.cuMemAlloc"] == 31 and base["fake.cuMemCreate"] == 0
    # Under the shim no allocation reaches the driver's cuMemAlloc; glake's core made chunks on the fake
    # (so it called the real driver, not the shim), and no free synchronised the context (they wait
    # for events instead).
    assert glake_run["fake.cuMemAlloc"] == 0 and glake_run["fake.cuMemFree"] == 0
    assert glake_run["fake.cuMemCreate"] > 0 and glake_run["fake.cuMemMap"] > 0
    assert glake_run["fake.cuCtxSynchronize"] == 0
    assert shimmed.stderr == ""
    assert not list((runtime_dir / "glake").glob("*.shim")), "the page is removed at exit"
    # GLAKE_SHIM_FREE=sync: every free synchronises the context first, as cudaFree is said to
    synced = run_shim(driver_program, "basic", fake_dir, runtime_dir, GLAKE_SHIM_FREE="sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert lines(synced.stdout, "R") == lines(plain.stdout, "R")
    assert counters(synced.stdout)["fake.cuCtxSynchronize"] >= 31


@pytest.mark.parametrize("free_mode", ["defer", "sync"])
def test_memory_freed_while_work_reads_it_is_not_reused_before_that_work(shim, driver_program, fake_dir,
                                                                          runtime_dir, free_mode):
    # a copy on a stream still reads the freed buffer for 300 ms while the program writes the next
    # allocation: under the shim that allocation never is the freed memory before the copy is done
    # (also when the stream was destroyed right after the copy was queued)
    r = run_shim(driver_program, "deferred", fake_dir, runtime_dir, GLAKE_SHIM_FREE=free_mode,
                 FAKE_CUDA_COPY_DELAY_US="300000")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "R deferred_ok 1" in r.stdout, r.stdout
    assert "VIOLATION" not in r.stderr, r.stderr
    assert (counters(r.stdout)["fake.cuCtxSynchronize"] >= 4) == (free_mode == "sync")


def start_paused(driver_program, mode: str, env: dict):
    """The driver-API program in `mode` under `glake run --shim`, once it said "PAUSED <pid>"."""
    proc = subprocess.Popen([*GLAKE, "run", "--shim", "--", str(driver_program), mode], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = ""
    while not line.startswith("PAUSED"):
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(proc.stderr.read())
    return proc, int(line.split()[1])


def glake_cli(env: dict, *cmd: str) -> subprocess.CompletedProcess:
    """`glake CMD...` in `env`."""
    return subprocess.run([*GLAKE, *cmd], env=env, capture_output=True, text=True, timeout=TIMEOUT)


def allocator_counters(pid: int, env: dict) -> dict:
    """The allocator section's counters of process `pid`'s stats (`glake stats PID --json`)."""
    out = glake_cli(env, "stats", str(pid), "--json")
    assert out.returncode == 0, out.stderr
    return next(s for s in json.loads(out.stdout)["sections"] if s["name"] == "allocator")["counters"]


def wait_for(pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("conf, chunk", [(None, 2 << 20), ("chunk_bytes:8MiB", 8 << 20)])
def test_stats_of_a_running_program(shim, driver_program, fake_dir, runtime_dir, conf, chunk):
    env = base_env(fake_dir, runtime_dir, GLAKE_REAL_LIBCUDA=str(fake_dir / "libcuda.so.1"), SHIM_TEST_PAUSE="1",
                   **({"GLAKE_ALLOC_CONF": conf} if conf else {}))
    proc, pid = start_paused(driver_program, "basic", env)
    try:
        assert pid == proc.pid  # glake run execs the program
        from glake.stats import shim_page

        os.environ["XDG_RUNTIME_DIR"], saved = str(runtime_dir), os.environ.get("XDG_RUNTIME_DIR")
        try:
            page = wait_for(lambda: (p := shim_page.read_pid(pid)) and
                            p["sections"][0]["counters"]["attribute_answers"] > 0 and p)
        finally:
            if saved is None:
                os.environ.pop("XDG_RUNTIME_DIR")
            else:
                os.environ["XDG_RUNTIME_DIR"] = saved
        out = subprocess.run([*GLAKE, "stats", str(pid), "--json"], env=env, capture_output=True, text=True,
                             timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["process"]["pid"] == pid and stats["process"]["server"] == "shim"
        assert stats["process"]["real_driver"] == str(fake_dir / "libcuda.so.1")
        shim_sec = next(s for s in stats["sections"] if s["name"] == "shim")
        alloc = next(s for s in stats["sections"] if s["name"] == "allocator")
        # 24 + 6 + 1 allocations, 12 freed: 19 live, every one glake's; glake never re-entered the shim.
        assert shim_sec["counters"]["live_allocations"] == 19 and shim_sec["counters"]["alloc_calls"] == 31
        assert shim_sec["counters"]["reentries"] == 0 and shim_sec["labels"]["mode"] == "active"
        # A free whose stream work had not finished when it was called is deferred: the allocator
        # still holds it until a later call finds the work done (none comes while the program waits)
        pending, pending_bytes = shim_sec["counters"]["free_pending"], shim_sec["counters"]["free_pending_bytes"]
        assert alloc["device"] == 0 and alloc["counters"]["allocation.all.current"] == 19 + pending
        assert (alloc["counters"]["requested_bytes.all.current"]
                == shim_sec["counters"]["live_requested_bytes"] + pending_bytes)
        assert alloc["counters"]["num_stitches"] > 0  # the 20 MiB requests were stitched from the holes
        assert alloc["counters"]["chunk_bytes"] == chunk  # the shim's default: 2 MiB, for per-buffer programs
        assert (page["sections"][1]["counters"]["allocation.all.current"]
                == 19 + page["sections"][0]["counters"]["free_pending"])
        ps = subprocess.run([*GLAKE, "ps", "--json"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert ps.returncode == 0, ps.stderr
        entry = next(e for e in json.loads(ps.stdout) if e["pid"] == pid)
        assert entry["status"] == "live" and entry["totals"]["allocated"] > 0 and entry["totals"]["stitches"] > 0
        table = subprocess.run([*GLAKE, "stats", str(pid)], env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert table.returncode == 0 and "allocated_bytes" in table.stdout, table.stderr
        proc.stdin.write("go\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert "R done" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (runtime_dir / "glake" / f"{pid}.shim").exists()


def test_suspend_and_resume_a_shimmed_program_from_outside(shim, driver_program, fake_dir, runtime_dir):
    env = base_env(fake_dir, runtime_dir, GLAKE_REAL_LIBCUDA=str(fake_dir / "libcuda.so.1"), SHIM_TEST_PAUSE="1")
    proc, pid = start_paused(driver_program, "suspend", env)
    try:

        def glake(*cmd):
            return glake_cli(env, *cmd)

        def allocator():
            return allocator_counters(pid, env)

        wait_for(lambda: allocator()["allocation.all.current"] == 6)
        sus = glake("suspend", str(pid))
        assert sus.returncode == 0 and "suspended device(s) 0" in sus.stdout, sus.stderr
        c = wait_for(lambda: (c := allocator())["suspended"] == 1 and c)
        assert c["suspended_host_bytes"] >= sum((1 + 3 * i) << 20 for i in range(6))
        again = glake("suspend", str(pid))
        assert again.returncode == 0 and "none (nothing to do)" in again.stdout  # already suspended
        res = glake("resume", str(pid))
        assert res.returncode == 0 and "resumed device(s) 0" in res.stdout, res.stderr
        wait_for(lambda: allocator()["suspended"] == 0)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        assert "R kept_ok 1" in out, out  # every byte back at the same addresses
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    gone = subprocess.run([*GLAKE, "suspend", str(pid)], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert gone.returncode != 0


def test_cu_get_proc_address_replaces_only_the_shims_names(shim, driver_program, fake_dir, runtime_dir):
    out = run_shim(driver_program, "procaddr", fake_dir, runtime_dir)
    assert out.returncode == 0, out.stderr
    got = {(p[1], int(p[2])): p for p in (line.split() for line in lines(out.stdout, "P"))}
    replaced = ("cuMemAlloc", "cuMemFree", "cuMemAllocPitch", "cuMemGetAddressRange", "cuPointerGetAttribute",
                "cuPointerGetAttributes", "cuIpcGetMemHandle", "cuGetProcAddress", "cuStreamCreate", "cuStreamDestroy")
    since = {"cuStreamCreate": 2000, "cuStreamDestroy": 2000}  # stream tracking for deferred frees
    for (name, version), p in got.items():
        if name in replaced and version >= since.get(name, 3020):
            assert "same=0" in p and "lib=libglake_shim.so" in p and "result=0/0" in p, p
        else:
            assert "same=1" in p, p  # the real driver's own answer, errors included
    assert "result=500/500" in " ".join(got[("cuMemAlloc", 2000)])  # no variant at 2000 in the fake: its answer


def test_ipc_on_glake_memory_is_refused(shim, driver_program, fake_dir, runtime_dir):
    plain = run_plain(driver_program, "ipc", fake_dir, runtime_dir)
    shimmed = run_shim(driver_program, "ipc", fake_dir, runtime_dir)
    assert plain.returncode == 0 and shimmed.returncode == 0, plain.stderr + shimmed.stderr
    assert lines(plain.stdout, "I") == ["I ipc 0", "I capable 1"]
    assert lines(shimmed.stdout, "I") == [f"I ipc {801}", "I capable 0"]  # CUDA_ERROR_NOT_SUPPORTED
    assert shimmed.stderr.count("cuIpcGetMemHandle(") == 1 and "does not support IPC" in shimmed.stderr


def test_fork_child_passes_through_and_parent_goes_on(shim, driver_program, fake_dir, runtime_dir):
    out = run_shim(driver_program, "fork", fake_dir, runtime_dir)
    assert out.returncode == 0, out.stderr
    assert lines(out.stdout, "F") == ["F child alloc=0 driver_allocs=1 free=0", "F child_exit 0", "F page_kept 1",
                                      "F parent_ok 1"]


def test_threads(shim, driver_program, fake_dir, runtime_dir):
    plain = run_plain(driver_program, "threads", fake_dir, runtime_dir)
    shimmed = run_shim(driver_program, "threads", fake_dir, runtime_dir)
    assert lines(plain.stdout, "R") == lines(shimmed.stdout, "R") == ["R threads_ok 1"], shimmed.stderr


def test_bad_conf_is_refused_before_the_program_starts(shim, driver_program, fake_dir, runtime_dir):
    out = run_shim(driver_program, "basic", fake_dir, runtime_dir, "--conf", "stitch:maybe")
    assert out.returncode == 2 and "not a boolean" in out.stderr and "R done" not in out.stdout
    out = run_shim(driver_program, "basic", fake_dir, runtime_dir, GLAKE_SHIM_FREE="later")
    assert out.returncode == 2 and "GLAKE_SHIM_FREE='later'" in out.stderr and "R done" not in out.stdout


def test_glake_that_cannot_start_passes_everything_through(shim, driver_program, fake_dir, runtime_dir):
    # Preloaded by hand with a bad GLAKE_ALLOC_CONF: said once, and the program runs on the driver alone.
    env = base_env(fake_dir, runtime_dir, GLAKE_REAL_LIBCUDA=str(fake_dir / "libcuda.so.1"), LD_PRELOAD=str(shim),
                   GLAKE_ALLOC_CONF="stitch:maybe")
    out = subprocess.run([str(driver_program), "basic"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("glake shim:") == 1 and "stitch:maybe" in out.stderr
    assert counters(out.stdout)["fake.cuMemAlloc"] == 31
    assert "R range_ok 1" in out.stdout and "R contents_ok 1" in out.stdout


def test_missing_real_driver(shim, driver_program, fake_dir, runtime_dir):
    out = run_shim(driver_program, "basic", fake_dir, runtime_dir, GLAKE_REAL_LIBCUDA="/nonexistent/libcuda.so.1")
    assert out.returncode == 2 and "GLAKE_REAL_LIBCUDA" in out.stderr
    env = base_env(fake_dir, runtime_dir, GLAKE_REAL_LIBCUDA=str(shim), LD_PRELOAD=str(shim))
    out = subprocess.run([str(driver_program), "basic"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode != 0 and "is the glake shim itself" in out.stderr


def test_cuda_runtime_reaches_the_driver_through_the_shim(shim, runtime_program, fake_dir, runtime_dir):
    # The fake cannot host the CUDA runtime: after resolving its entry points through cuGetProcAddress_v2
    # and calling cuDriverGetVersion, the runtime needs cuGetExportTable (the driver's private tables),
    # so cudaMalloc fails (801) with or without the shim. What the CPU can show: the same run both ways,
    # and that the runtime's libcuda.so.1 is the shim (it complains when its real driver is missing).
    lib = str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "lib64")
    extra = {"FAKE_CUDA_LOG_UNSUPPORTED": "1"}
    plain = subprocess.run([str(runtime_program)], capture_output=True, text=True, timeout=TIMEOUT,
                           env=base_env(fake_dir, runtime_dir, LD_LIBRARY_PATH=f"{fake_dir}:{lib}", **extra))
    env = base_env(fake_dir, runtime_dir, GLAKE_REAL_LIBCUDA=str(fake_dir / "libcuda.so.1"), **extra)
    env["LD_LIBRARY_PATH"] = lib
    shimmed = subprocess.run([*GLAKE, "run", "--shim", "--", str(runtime_program)], capture_output=True, text=True,
                             timeout=TIMEOUT, env=env)
    assert plain.stdout == shimmed.stdout and plain.stdout.startswith("malloc 801")
    assert "cuGetExportTable called" in plain.stderr and "cuGetExportTable called" in shimmed.stderr
    nowhere = base_env(fake_dir, runtime_dir, GLAKE_REAL_LIBCUDA="/nonexistent/libcuda.so.1", LD_PRELOAD=str(shim),
                       LD_LIBRARY_PATH=lib)
    missing = subprocess.run([str(runtime_program)], capture_output=True, text=True, timeout=TIMEOUT, env=nowhere)
    assert "glake shim: GLAKE_REAL_LIBCUDA=/nonexistent/libcuda.so.1" in missing.stderr
