"""Build glake: setup.py drives the CMake build of the C++ core into the glake/ package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt at the repository root."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build with CMake, putting every library next to glake/_C."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = os.environ.get("GLAKE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DGLAKE_WITH_CUDA={os.environ.get('GLAKE_WITH_CUDA', 'ON')}",
        ]
        try:
            subprocess.run(["ninja", "--version"], check=True, capture_output=True)
            args.append("-GNinja")
        except (OSError, subprocess.CalledProcessError):
            pass
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        self._built_libs = list(out_dir.glob("lib*.so"))

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False) or self.inplace:
            # pip install -e and build_ext --inplace copy only _C into the sources; the libraries must follow.
            for lib in getattr(self, "_built_libs", []):
                shutil.copy2(lib, ROOT / "glake" / lib.name)


setup(ext_modules=[CMakeExtension("glake._C")], cmdclass={"build_ext": CMakeBuild})
