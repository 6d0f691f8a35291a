"""The libcuda shim on a real GPU and driver: a driver-API program, a CUDA runtime program (static and
shared cudart, which the fake libcuda cannot host) and PyTorch training a step (with and without its
caching allocator) give the same results under `glake run --shim` as without it, and their memory
comes from glake (the shim's stats page says so); so do JAX with the platform allocator and CuPy without
its pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shim.conftest import GLAKE
from tests.shim.test_shim import lines

pytestmark = pytest.mark.gpu
TIMEOUT = 180


def gpu_env(runtime_dir: Path, **extra: str) -> dict:
    drop = ("LD_PRELOAD", "GLAKE_ALLOC_CONF", "GLAKE_BACKEND", "GLAKE_REAL_LIBCUDA", "FAKE_CUDA_PATH",
            "FAKE_CUDA_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(XDG_RUNTIME_DIR=str(runtime_dir), **extra)
    return env


def run(cmd: list, env: dict, shim: bool) -> subprocess.CompletedProcess:
    full = [*GLAKE, "run", "--shim", "--", *cmd] if shim else cmd
    return subprocess.run(full, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_driver_program_on_the_gpu(shim, driver_program, runtime_dir):
    env = gpu_env(runtime_dir)
    plain, shimmed = run([str(driver_program), "basic"], env, False), run([str(driver_program), "basic"], env, True)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert shimmed.returncode == 0, shimmed.stdout + shimmed.stderr
    # cuMemGetInfo's figures differ (glake's pool holds memory); every other result is the same.
    keep = [x for x in lines(plain.stdout, "R") if not x.startswith("R meminfo")]
    assert [x for x in lines(shimmed.stdout, "R") if not x.startswith("R meminfo")] == keep
    assert "R contents_ok 1" in shimmed.stdout and "R range_ok 1" in shimmed.stdout
    assert "R attr_ok 1" in shimmed.stdout and "R done" in shimmed.stdout


@pytest.mark.parametrize("free_mode", ["defer", "sync"])
def test_frees_while_a_stream_copies_on_the_gpu(shim, driver_program, runtime_dir, free_mode):
    # the deferred-free program on the real driver: events on the legacy and a non-blocking stream,
    # a stream destroyed with its copy queued; what the copies deliver is intact either way
    out = run([str(driver_program), "deferred"], gpu_env(runtime_dir, GLAKE_SHIM_FREE=free_mode), True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "R deferred_ok 1" in out.stdout, out.stdout


def test_cuda_runtime_program_on_the_gpu(shim, runtime_program, runtime_dir):
    env = gpu_env(runtime_dir)
    plain, shimmed = run([str(runtime_program)], env, False), run([str(runtime_program)], env, True)
    assert plain.returncode == 0 and plain.stdout.startswith("malloc 0"), plain.stdout + plain.stderr
    assert shimmed.returncode == 0, shimmed.stdout + shimmed.stderr
    for out in (plain.stdout, shimmed.stdout):
        assert "eq=1" in out and "attr 0 type=2 dev=0" in out and "free 0" in out, out


PAGE = """
page = None
if os.environ.get("READ_PAGE"):
    from glake.stats import shim_page
    page = shim_page.read_pid(os.getpid())
"""

TORCH_PROGRAM = r"""
import json, os
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(256, 512, device="cuda"), torch.randn(256, 512, device="cuda")
losses = []
for _ in range(3):
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(round(loss.item(), 5))
""" + PAGE + """
print(json.dumps({"result": losses, "page": page}))
"""

JAX_PROGRAM = r"""
import json, os
import jax, jax.numpy as jnp
k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
w1, w2 = jax.random.normal(k1, (512, 2048)) * 0.02, jax.random.normal(k2, (2048, 512)) * 0.02
x = jax.random.normal(k3, (256, 512))
y = jnp.roll(x, 1, axis=1)
loss = lambda w, x, y: jnp.mean((jax.nn.gelu(x @ w[0]) @ w[1] - y) ** 2)
step = jax.jit(lambda w, x, y: jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, w, jax.grad(loss)(w, x, y)))
w, losses = (w1, w2), []
for _ in range(3):
    w = step(w, x, y)
    losses.append(round(float(loss(w, x, y)), 3))
assert jax.devices()[0].platform == "gpu", jax.devices()
""" + PAGE + """
print(json.dumps({"result": losses, "page": page}))
"""

CUPY_PROGRAM = r"""
import json, os
import cupy as cp
cp.cuda.set_allocator(None)  # the pool off: every array is a cudaMalloc, every drop a cudaFree
cp.cuda.set_pinned_memory_allocator(None)
rs = cp.random.RandomState(0)
a = rs.standard_normal((1024, 1024), dtype=cp.float32)
out = []
keep = [rs.standard_normal(n, dtype=cp.float32) for n in (1 << 20, 3 << 19, 1 << 22)]  # 4-16 MiB, live
for i in range(4):  # arrays of sizes that do not repeat, made and dropped: a fragmenting pattern
    b = a @ a.T / 1024 + i
    c = cp.fft.rfft(b, axis=1)
    out.append(round(float(cp.abs(c).mean()), 3))
    a = cp.tanh(b[: 1024 - 64 * (i + 1)].repeat(2, axis=0)[:1024])
out.append(round(float(sum(float(k.sum()) for k in keep)), 1))
""" + PAGE + """
print(json.dumps({"result": out, "page": page}))
"""


def check_same_under_the_shim(runtime_dir, program: str, min_live: int, **env_extra: str) -> None:
    """``program`` prints its results and (under the shim) its own stats page: same results both ways,
    the page active, no re-entry, at least ``min_live`` bytes of glake memory live when it looked."""
    env = gpu_env(runtime_dir, **env_extra)
    cmd = [sys.executable, "-c", program]
    plain = run(cmd, env, False)
    shimmed = run(cmd, {**env, "READ_PAGE": "1"}, True)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert shimmed.returncode == 0, shimmed.stderr[-3000:]
    p, s = json.loads(plain.stdout.splitlines()[-1]), json.loads(shimmed.stdout.splitlines()[-1])
    assert s["result"] == p["result"]
    page = s["page"]
    assert page is not None, "no stats page while running under the shim"
    shim_sec = next(x for x in page["sections"] if x["name"] == "shim")
    alloc = next(x for x in page["sections"] if x["name"] == "allocator")
    assert shim_sec["labels"]["mode"] == "active", page["process"]
    assert shim_sec["counters"]["reentries"] == 0
    print("shim counters:", shim_sec["counters"], "allocator live bytes:", alloc["counters"]["requested_bytes.all.current"])
    assert alloc["counters"]["requested_bytes.all.current"] >= min_live


def test_torch_trains_a_step_under_the_shim(runtime_dir):
    # torch's own caching allocator: its segments (cudaMalloc) come from glake
    check_same_under_the_shim(runtime_dir, TORCH_PROGRAM, 8 << 20)


def test_torch_without_its_cache_under_the_shim(runtime_dir):
    check_same_under_the_shim(runtime_dir, TORCH_PROGRAM, 8 << 20, PYTORCH_NO_CUDA_MEMORY_CACHING="1")


def test_jax_platform_allocator_under_the_shim(runtime_dir):
    # XLA_PYTHON_CLIENT_ALLOCATOR=platform: XLA asks the driver for each buffer; the arrays live
    # when the page is read (two weight matrices, 8 MiB) are glake memory
    pytest.importorskip("jax")
    check_same_under_the_shim(runtime_dir, JAX_PROGRAM, 8 << 20, XLA_PYTHON_CLIENT_ALLOCATOR="platform",
                              XLA_PYTHON_CLIENT_PREALLOCATE="false")


def test_cupy_without_its_pool_under_the_shim(runtime_dir):
    pytest.importorskip("cupy")
    check_same_under_the_shim(runtime_dir, CUPY_PROGRAM, 24 << 20)


@pytest.fixture
def dedup_env(runtime_dir, tmp_path):
    from tests.dedup.util import stop_broker

    sock = str(tmp_path / "dedup.sock")
    yield gpu_env(runtime_dir, GLAKE_DEDUP="1", GLAKE_DEDUP_SOCKET=sock)
    stop_broker(sock)


def test_dedup_hint_shares_equal_chunks_between_processes_on_the_gpu(shim, dedup_program, dedup_env):
    """160 MiB (80 chunks: two broker batches) in each process; digests and comparisons on the GPU,
    except in one process that computes them on the host (the two must give the same digests)."""
    from tests.shim.test_shim_dedup import Worker

    mib = 160
    workers = []
    try:
        for env in (dedup_env, dedup_env, dict(dedup_env, GLAKE_DEDUP_HOST="1")):
            workers.append(Worker(dedup_program, env, mib=mib))
        workers.append(Worker(dedup_program, dedup_env, differ=5, mib=mib))
        first, second, host, differ = workers
        assert first.r["share"] == ["0", str(mib << 20)] and first.r["saved"] == ["0"]
        assert second.r["saved"] == [str(mib << 20)] and host.r["saved"] == [str(mib << 20)]
        assert differ.r["saved"] == [str((mib - 2) << 20)]  # chunk 5 stayed its own
        for w in workers:
            assert w.r["intact"] == ["1"] and w.ask("check", "intact")["intact"] == ["1"]
        first.proc.kill()  # the exporter gone: the others read on
        first.proc.wait()
        assert second.ask("check", "intact")["intact"] == ["1"]
        r = second.ask("free", "after_free")
        assert r["rewrite"] == ["1"] and r["after_free"] == ["0", "0"]
    finally:
        errs = [w.close() for w in workers]
    for w, err in zip(workers[1:], errs[1:]):
        assert "dedup kernels cannot be used" not in err, err  # the GPU path ran (the host one where forced)


def test_dedup_hint_never_shares_on_a_forced_collision_on_the_gpu(shim, dedup_program, dedup_env):
    from tests.shim.test_shim_dedup import Worker

    env = dict(dedup_env, GLAKE_DEDUP_TEST_COLLIDE="1")
    workers = []
    try:
        workers.append(Worker(dedup_program, env, seed=1, mib=32))
        workers.append(Worker(dedup_program, env, seed=2, mib=32))
        assert workers[0].r["share"] == ["0", str(2 << 20)] and workers[1].r["share"] == ["0", "0"]  # as on the fake
        assert workers[1].r["saved"] == ["0"] and workers[1].r["intact"] == ["1"]
        assert workers[0].ask("check", "intact")["intact"] == ["1"]
    finally:
        for w in workers:
            w.close()
