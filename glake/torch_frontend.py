"""Build and load glake's torch frontend: torch's C++ allocator interface over glake.

The frontend (``csrc/torch/``) implements ``c10::cuda::CUDACachingAllocator::CUDAAllocator``, so
torch's own memory API, snapshots, history, OOM type, graph pools and MemPool work with glake as
they do with torch's allocator. It must be compiled against the torch it runs with, so it is built
with ``torch.utils.cpp_extension`` on first use (about 20-60 s, with a message) and cached under
``$GLAKE_CACHE_DIR`` (default ``~/.cache/glake``) per torch version and source hash. It reaches
glake only through the C ABI of ``libglake_torch.so`` (``csrc/plugin/glake_c_api.h``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

_PKG = Path(__file__).resolve().parent
_SOURCES = ("torch/frontend.cpp", "torch/history.cpp")
_HEADERS = ("torch/history.h", "plugin/glake_c_api.h")
# torch's CPU wheels ship c10/cuda but not this generated header; the CUDA wheels have it.
_CUDA_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"
_CUDA_MACROS_TEXT = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def source_root() -> Path:
    """The folder holding ``torch/`` and ``plugin/`` sources: the installed copy, else the source tree."""
    for root in (_PKG / "_csrc", _PKG.parent / "csrc"):
        if all((root / f).is_file() for f in _SOURCES + _HEADERS):
            return root
    raise FileNotFoundError(f"glake's torch frontend sources are missing (looked in {_PKG / '_csrc'} and "
                            f"{_PKG.parent / 'csrc'}); reinstall glake")


def cache_root() -> Path:
    """Where built frontends are kept (``$GLAKE_CACHE_DIR`` or ``~/.cache/glake``)."""
    env = os.environ.get("GLAKE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "glake"


def _fingerprint(root: Path) -> str:
    import torch

    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    for f in _SOURCES + _HEADERS:
        h.update((root / f).read_bytes())
    return h.hexdigest()[:12]


def build_dir(root: Optional[Path] = None) -> Path:
    """The build folder for this torch, Python and source version."""
    import torch

    root = root or source_root()
    tag = "torch" + torch.__version__.replace("+", "_")
    return cache_root() / "torch-frontend" / f"{tag}-{_fingerprint(root)}"


def _compat_include(where: Path) -> List[str]:
    import torch.utils.cpp_extension as ce

    if any((Path(d) / _CUDA_MACROS).is_file() for d in ce.include_paths()):
        return []
    header = where / "compat" / _CUDA_MACROS
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text(_CUDA_MACROS_TEXT)
    return [str(where / "compat")]


def _cuda_include() -> List[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    dirs = [os.path.join(d, "include") for d in (CUDA_HOME, "/usr/local/cuda") if d]
    return [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))][:1]


def load(verbose: bool = False, with_cuda: bool = True) -> ModuleType:
    """Build (once) and import the frontend module.

    Parameters
    ----------
    verbose
        Show the compiler's commands and output.
    with_cuda
        Link torch's CUDA libraries (needs a CUDA build of torch). ``False`` builds against a CPU
        build's headers: the module then compiles and links, but cannot be imported.

    Raises
    ------
    ImportError, RuntimeError, OSError
        The build or the import failed (the message says why).
    """
    import torch.utils.cpp_extension as ce

    root = source_root()
    where = build_dir(root)
    where.mkdir(parents=True, exist_ok=True)
    name = "glake_torch_frontend_" + where.name.rsplit("-", 1)[1]
    if not verbose and not any(where.glob(name + "*.so")):
        print(f"glake: building the torch frontend for torch {__import__('torch').__version__} in {where} "
              "(once per torch version; 20-60 s)...", file=sys.stderr, flush=True)
    lib = _PKG / "libglake_torch.so"
    if not lib.is_file():
        raise FileNotFoundError(f"{lib} is missing: glake's C++ build did not finish; reinstall glake")
    return ce.load(
        name=name,
        sources=[str(root / f) for f in _SOURCES],
        extra_include_paths=[str(root), *_cuda_include(), *_compat_include(where)],
        extra_cflags=["-O2"],
        extra_ldflags=[str(lib), f"-Wl,-rpath,{_PKG}"],
        build_directory=str(where),
        with_cuda=with_cuda,
        verbose=verbose,
    )


def check_build() -> Path:
    """Compile and link the frontend against the installed torch without importing it (CI does this
    with the CPU build of torch, whose headers suffice to check the frontend against torch's
    interface); returns the built library."""
    try:
        load(with_cuda=False)
    except ImportError as e:  # a CPU build of torch has no CUDA symbols to import against
        if "undefined symbol" not in str(e):
            raise
    where = build_dir()
    built = sorted(where.glob("glake_torch_frontend_*.so"))
    if not built:
        raise RuntimeError(f"the torch frontend did not build in {where}")
    return built[-1]


__all__ = ["load", "check_build", "source_root", "cache_root", "build_dir"]

if __name__ == "__main__":  # python -m glake.torch_frontend: build now (e.g. in a Docker image)
    print(load(verbose="-v" in sys.argv).__file__)
