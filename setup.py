"""Build glake: setup.py drives the CMake build of the C++ core into the glake/ package.

- The CMake build directory persists (``build/cmake-<python tag>-<build type>``), so a second
  ``pip install -e .`` with nothing changed compiles nothing. pybind11 is copied once to a fixed
  place beside it (pip's isolated build environment has a new path every time, which would
  otherwise make every binding file look changed).
- Libraries are installed atomically: a new file next to the old one, then a rename. A running
  glake process keeps the old file (its mapping stays valid) instead of having it rewritten under it.
- One line says which backends were built and how much was compiled (``pip install -v`` shows it).
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_ROOT = ROOT / "build"


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt at the repository root."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def install_atomically(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a new file and a rename: whoever has ``dst`` open or mapped keeps the old one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def stable_pybind11_dir() -> Path:
    """pybind11's CMake directory, from a copy at a path that does not change between builds."""
    import pybind11

    src = Path(pybind11.__file__).resolve().parent
    dst = BUILD_ROOT / f"pybind11-{pybind11.__version__}"
    if not (dst / "share" / "cmake" / "pybind11").is_dir():
        tmp = BUILD_ROOT / f".pybind11-{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    return dst / "share" / "cmake" / "pybind11"


def cached_generator(build_dir: Path) -> Optional[str]:
    """The generator an existing build directory was configured with, if any."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return None
    m = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", cache.read_text(errors="replace"), re.M)
    return m.group(1) if m else None


def run_logged(cmd: List[str], cwd: Path) -> str:
    """Run ``cmd``, echoing its output to stderr (pip shows it with -v or on failure); return the output."""
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stderr.write(proc.stdout)
    sys.stderr.flush()
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout)
    return proc.stdout


# What glake/torch_frontend.py compiles (keep in step with its _SOURCES and _HEADERS).
FRONTEND_SOURCES = ("torch/frontend.cpp", "torch/history.cpp", "torch/history.h", "plugin/glake_c_api.h")


class CMakeBuild(build_ext):
    """Configure and build with CMake in a persistent directory; install the libraries next to glake/_C."""

    def build_extension(self, ext: Extension) -> None:
        config = os.environ.get("GLAKE_BUILD_TYPE", "Release")
        tag = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir = BUILD_ROOT / f"cmake-{tag}-{config}"
        lib_dir = build_dir / "lib"
        build_dir.mkdir(parents=True, exist_ok=True)
        ninja = shutil.which("ninja")
        generator = "Ninja" if ninja else "Unix Makefiles"
        if cached_generator(build_dir) not in (None, generator):  # e.g. ninja gone since the last build
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)
        args = [
            f"-G{generator}",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={stable_pybind11_dir()}",
            f"-DGLAKE_WITH_CUDA={os.environ.get('GLAKE_WITH_CUDA', 'ON')}",
        ]
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        configured = run_logged(["cmake", str(ROOT), *args], build_dir)
        jobs = str(os.cpu_count() or 2)
        built = run_logged(["cmake", "--build", ".", "--parallel", jobs], build_dir)

        backends = ["host"]
        if re.search(r"glake: cuda backend ON", configured):
            backends.append("cuda")
        compiled = len(re.findall(r"Building CXX object", built))
        linked = len(re.findall(r"Linking CXX", built))
        work = f"{compiled} files compiled, {linked} linked" if compiled or linked else "nothing to rebuild"
        sys.stderr.write(f"glake build: backends {', '.join(backends)}; {work} "
                         f"(build directory {build_dir.relative_to(ROOT)})\n")

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        self._built_libs = sorted(lib_dir.glob("*.so"))
        for lib in self._built_libs:
            install_atomically(lib, out_dir / lib.name)
        if not (getattr(self, "editable_mode", False) or self.inplace):
            # The torch frontend is compiled against the user's torch on first use: ship its sources
            # (an editable install reads them from the source tree).
            for rel in FRONTEND_SOURCES:
                dst = out_dir / "_csrc" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / "csrc" / rel, dst)

    def copy_extensions_to_source(self) -> None:
        """``pip install -e`` / ``build_ext --inplace``: _C and the libraries into glake/, atomically."""
        for lib in getattr(self, "_built_libs", []):
            install_atomically(lib, ROOT / "glake" / lib.name)


setup(ext_modules=[CMakeExtension("glake._C")], cmdclass={"build_ext": CMakeBuild})
