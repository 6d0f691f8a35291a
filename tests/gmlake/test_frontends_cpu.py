"""The torch frontend and `glake run` on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import glake
from tests.gmlake.helpers import MiB


def test_install_without_gpu_is_a_clear_error():
    torch = pytest.importorskip("torch")
    import glake.torch as gt

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(glake.BackendUnavailableError, match="needs a CUDA GPU"):
        gt.install()
    assert not gt.is_installed()
    assert os.path.exists(gt.plugin_path())


def test_format_summary_reads_like_torch():
    import glake.torch as gt

    a = glake.Allocator(backend="host")
    ptrs = [a.malloc(4 * MiB) for _ in range(4)]
    a.free(ptrs[0])
    a.free(ptrs[2])
    p = a.malloc(8 * MiB)
    text = gt.format_summary(a.stats())
    assert "Allocated memory" in text and "Reserved memory" in text and "Stitched memory" in text
    assert "Stitches (new / reused)" in text and "1 / 0" in text
    assert "16.00 MiB" in text  # reserved
    for q in (p, ptrs[1], ptrs[3]):
        a.free(q)


def test_glake_run_passes_arguments_and_exit_code():
    code = "import os, sys; print(os.environ['GLAKE_AUTO_INSTALL'], os.environ.get('GLAKE_ALLOC_CONF'), sys.argv[1:]); sys.exit(4)"
    out = subprocess.run([sys.executable, "-m", "glake.cli", "run", "--conf", "stitch:false", "--", sys.executable,
                          "-c", code, "x", "--y"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 4, out.stderr
    assert out.stdout.strip() == "1 stitch:false ['x', '--y']"
    out = subprocess.run([sys.executable, "-m", "glake.cli", "run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "nothing to run" in out.stderr


def test_glake_run_hook_fires_on_torch_import():
    pytest.importorskip("torch")
    code = "import torch; print('imported')"
    out = subprocess.run([sys.executable, "-m", "glake.cli", "run", "--", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "imported" in out.stdout
    import torch

    if not torch.cuda.is_available():  # the hook ran, and said why it could not install
        assert "glake run: torch keeps its own allocator" in out.stderr
