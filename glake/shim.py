"""``glake run --shim``: the environment that preloads the libcuda shim (csrc/shim, docs/shim.md).

The shim is ``libglake_shim.so`` beside this package, a library whose SONAME is ``libcuda.so.1``. The
program gets it twice: in ``LD_PRELOAD`` (loaded first, so the loader's and the CUDA runtime's lookups
of ``libcuda.so.1`` find it already there) and through ``LD_LIBRARY_PATH`` (a private directory where
``libcuda.so.1`` links to it, for children that drop ``LD_PRELOAD``). The real driver is named by
absolute path in ``GLAKE_REAL_LIBCUDA``, found here with ``ldconfig -p``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Dict, List, Optional

REAL_ENV = "GLAKE_REAL_LIBCUDA"
FREE_ENV = "GLAKE_SHIM_FREE"  # "defer" (the default) or "sync": what cuMemFree of glake memory waits for
FREE_MODES = ("defer", "sync")
USUAL_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/aarch64-linux-gnu", "/usr/lib",
              "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib", "/usr/local/cuda/compat")
_LDCONFIG_ARCH = {"x86_64": "x86-64", "aarch64": "AArch64", "ppc64le": "ppc64le"}


class ShimError(RuntimeError):
    """The shim cannot be used here (not built, or no real driver found)."""


def shim_library() -> str:
    """The path of ``libglake_shim.so``; raises ShimError when this build has none."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libglake_shim.so")
    if not os.path.exists(path):
        raise ShimError(f"{path} does not exist: glake was built without cuda.h, so without the libcuda shim")
    return path


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def ldconfig_candidates() -> List[str]:
    """Paths of ``libcuda.so.1`` in the loader's cache (``ldconfig -p``) for this machine's architecture."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        try:
            out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
    arch = _LDCONFIG_ARCH.get(platform.machine(), "")
    found = []
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("libcuda.so.1 ") or "=>" not in line:
            continue
        desc, path = line.split("=>", 1)
        if arch and arch not in desc and "," in desc:  # another architecture's copy (e.g. i386)
            continue
        found.append(path.strip())
    return found


def find_real_libcuda(shim: Optional[str] = None) -> str:
    """The real driver: ``$GLAKE_REAL_LIBCUDA``, else ``ldconfig -p``, else the usual folders; never the shim."""
    shim = shim or shim_library()
    env = os.environ.get(REAL_ENV)
    if env:
        if not os.path.isabs(env) or not os.path.exists(env):
            raise ShimError(f"{REAL_ENV}={env} must be the absolute path of an existing libcuda.so.1")
        if _same(env, shim):
            raise ShimError(f"{REAL_ENV}={env} is the glake shim itself, not the real driver")
        return env
    candidates = ldconfig_candidates() + [os.path.join(d, "libcuda.so.1") for d in USUAL_DIRS]
    for path in candidates:
        if os.path.exists(path) and not _same(path, shim):
            return path
    raise ShimError("no real libcuda.so.1 found (ldconfig -p, " + ", ".join(USUAL_DIRS) + f"); set {REAL_ENV} "
                    "to its absolute path")


def link_dir(shim: str) -> str:
    """A private directory (in the stats runtime directory) holding ``libcuda.so.1`` -> the shim."""
    from glake.stats import paths

    d = os.path.join(paths.ensure_runtime_dir(), "shim-lib")
    os.makedirs(d, mode=0o700, exist_ok=True)
    link = os.path.join(d, "libcuda.so.1")
    if os.path.realpath(link) != os.path.realpath(shim):
        tmp = f"{link}.{os.getpid()}.tmp"
        os.symlink(shim, tmp)
        os.replace(tmp, link)
    return d


def shim_env(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with the shim preloaded and the real driver named; raises ShimError."""
    if env.get(FREE_ENV, "defer") not in FREE_MODES:
        raise ShimError(f"{FREE_ENV}={env[FREE_ENV]!r}: use defer (frees wait for events, the default) or sync "
                        "(every free synchronises the context first)")
    shim = shim_library()
    out = dict(env)
    saved = os.environ.get(REAL_ENV)
    try:
        if REAL_ENV in env:
            os.environ[REAL_ENV] = env[REAL_ENV]
        out[REAL_ENV] = find_real_libcuda(shim)
    finally:
        if saved is None:
            os.environ.pop(REAL_ENV, None)
        else:
            os.environ[REAL_ENV] = saved
    out["LD_PRELOAD"] = ":".join(p for p in (shim, env.get("LD_PRELOAD", "")) if p)
    out["LD_LIBRARY_PATH"] = ":".join(p for p in (link_dir(shim), env.get("LD_LIBRARY_PATH", "")) if p)
    return out


__all__ = ["FREE_ENV", "FREE_MODES", "ShimError", "shim_library", "ldconfig_candidates", "find_real_libcuda", "link_dir", "shim_env"]
