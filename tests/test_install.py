"""Installing glake as the README says: reinstalling under a live process, incremental builds, a source
tree that shadows the installed package, and packaging metadata setuptools accepts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import glake

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "glake")
LIBS = ("libglake_core.so", "libglake_torch.so", os.path.basename(glake._C.__file__))

LIVE = textwrap.dedent("""
    import ctypes, json, os, sys
    import glake
    a = glake.Allocator(backend="host")
    p = a.malloc(8 << 20)
    torch_plugin = ctypes.CDLL(os.path.join(os.path.dirname(glake.__file__), "libglake_torch.so"))
    print(json.dumps(sorted({line.split(None, 5)[5].strip() for line in open("/proc/self/maps")
                             if "glake" in line and ".so" in line})), flush=True)
    sys.stdin.readline()                      # the reinstall happens here
    maps = [line.strip() for line in open("/proc/self/maps") if "glake" in line and ".so" in line]
    q = a.malloc(64 << 20)                    # the core still works: allocate, stitch, free, stats
    a.free(p); a.free(q)
    r = glake.Allocator(backend="host", limit_bytes="1GB").malloc(1 << 20)
    print(json.dumps({"maps": maps, "allocated": a.stats()["allocated_bytes.all.current"]}), flush=True)
""")


def pip_install_editable() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-v", "-e", ROOT],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def editable():
    if os.path.dirname(os.path.abspath(glake.__file__)) != PKG:
        pytest.skip(f"glake is not installed from this tree in editable mode (it is {glake.__file__})")


def test_reinstall_replaces_libraries_under_a_live_process(editable, tmp_path):
    child = subprocess.Popen([sys.executable, "-c", LIVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        mapped = json.loads(child.stdout.readline() or "null")
        assert mapped is not None, child.stderr.read()
        assert {os.path.basename(m) for m in mapped} >= set(LIBS)
        before = {lib: os.stat(os.path.join(PKG, lib)).st_ino for lib in LIBS}
        log = pip_install_editable()
        after = {lib: os.stat(os.path.join(PKG, lib)).st_ino for lib in LIBS}
        child.stdin.write("go\n")
        child.stdin.flush()
        reply = child.stdout.readline()
        assert child.wait(120) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    report = json.loads(reply)
    for lib in LIBS:
        assert after[lib] != before[lib], f"{lib} was rewritten in place (same inode): a live process would crash"
        assert any(lib in m and "(deleted)" in m for m in report["maps"]), report["maps"]  # it kept the old file
    assert report["allocated"] == 0
    assert re.search(r"glake build: backends host(, cuda)?; ", log), log[-3000:]
    assert "project.license" not in log and "TOML table is deprecated" not in log


def test_second_install_compiles_nothing(editable):
    pip_install_editable()  # brings the build directory up to date with this tree
    log = pip_install_editable()
    (line,) = re.findall(r"glake build: .*", log)
    assert "nothing to rebuild" in line, line
    built = "cuda" if glake._C.cuda_backend_built() else "host"
    assert f"backends host{', cuda' if built == 'cuda' else ''};" in line


def test_a_source_tree_shadowing_the_installed_glake_is_explained(tmp_path):
    """Python run inside a glake checkout that has no built _C imports that tree, not the installed glake."""
    import shutil

    site = tmp_path / "site"  # the "installed" glake, with its metadata
    shutil.copytree(PKG, site / "glake", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "glake-0.1.0.dist-info").mkdir()
    (site / "glake-0.1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: glake\nVersion: 0.1.0\n")
    tree = tmp_path / "checkout"  # a source tree: setup.py and glake/ without the built libraries
    shutil.copytree(PKG, tree / "glake", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(os.path.join(ROOT, "setup.py"), tree / "setup.py")
    env = dict(os.environ, PYTHONPATH=str(site))
    ok = subprocess.run([sys.executable, "-S", "-c", "import glake; print(glake.__file__)"], capture_output=True,
                        text=True, cwd=tmp_path, env=env, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == str(site / "glake" / "__init__.py"), ok.stderr
    out = subprocess.run([sys.executable, "-S", "-c", "import glake"], capture_output=True, text=True, cwd=tree,
                         env=env, timeout=120)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert "circular import" not in err
    assert f"glake is being imported from {tree / 'glake'}, a glake source tree that has no built glake._C" in err
    assert f"The installed glake is {site / 'glake'}." in err and "Run Python from another directory" in err


def test_license_is_an_spdx_expression():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert meta["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in meta["build-system"]["requires"]  # the first to read PEP 639 license strings
