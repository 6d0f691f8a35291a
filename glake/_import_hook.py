"""Install glake into torch and CuPy right after they are first imported (for `glake run`).

Nothing is imported eagerly: a program that never imports torch pays nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable, Dict


def _install_torch() -> None:
    import glake.torch

    reason = glake.torch.auto_install()
    if reason:
        print(f"glake run: torch keeps its own allocator: {reason}", file=sys.stderr)


def _install_cupy() -> None:
    import glake
    import glake.cupy

    try:
        glake.cupy.install()
    except glake.GlakeError as e:
        print(f"glake run: CuPy keeps its own allocator: {e}", file=sys.stderr)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of a watched module to run a hook after it."""

    def __init__(self, hooks: Dict[str, Callable[[], None]]) -> None:
        self.hooks = hooks

    def find_spec(self, name, path, target=None):
        hook = self.hooks.pop(name, None)
        if hook is None:
            return None
        if not self.hooks:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            hook()

        spec.loader.exec_module = exec_module
        return spec


def watch_imports() -> None:
    """Arm the hooks for torch and cupy."""
    sys.meta_path.insert(0, _Watcher({"torch": _install_torch, "cupy": _install_cupy}))
