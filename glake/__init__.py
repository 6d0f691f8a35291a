"""glake: GPU memory management for PyTorch users and LLM serving.

The core (``glake.core``) manages physical chunks and virtual address ranges through one of two
backends: ``cuda`` (the CUDA driver's virtual memory API) or ``host`` (the same semantics on host
memory, so everything runs and is tested without a GPU).
"""

from __future__ import annotations

import os
import warnings


def _explain_missing_core(error: ImportError) -> ImportError:
    """Why ``glake._C`` cannot be imported, for people: usually a source tree shadowing the installed glake."""
    here = os.path.dirname(os.path.abspath(__file__))
    if any(n.startswith("_C.") and n.endswith(".so") for n in os.listdir(here)):
        return error  # the module is there but does not load (a broken build): its own error says why
    root = os.path.dirname(here)
    installed = ""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = os.path.abspath(str(distribution("glake").locate_file("glake")))
        if path != here:
            installed = f" The installed glake is {path}."
    except PackageNotFoundError:
        installed = " No glake is installed in this Python."
    tree = "a glake source tree" if os.path.exists(os.path.join(root, "setup.py")) else "a directory"
    return ImportError(
        f"glake is being imported from {here}, {tree} that has no built glake._C; it shadows the glake you "
        f"installed (Python looks in the current directory first).{installed} Run Python from another directory, "
        f"or build this tree in place: pip install -e {root}")


try:
    from glake import _C
except ImportError as _e:
    raise _explain_missing_core(_e) from None

from glake.errors import BackendUnavailableError, GlakeError, GlakeWarning, InvalidArgumentError, OutOfMemoryError  # noqa: E402

__version__ = "0.1.0"

if not _C.cuda_backend_built():
    warnings.warn("glake was built without cuda.h: only the host backend is available in this build",
                  GlakeWarning, stacklevel=2)

from glake import core  # noqa: E402  (after the warning, so it is issued once, here)
from glake.allocator import Allocator  # noqa: E402
from glake.core import backend_name  # noqa: E402  (the one definition)
from glake.suspension import prepare_suspend, release_suspend_host, resume, suspend  # noqa: E402

__all__ = [
    "backend_name", "core", "Allocator", "GlakeError", "OutOfMemoryError", "InvalidArgumentError",
    "BackendUnavailableError", "GlakeWarning", "__version__", "suspend", "resume", "prepare_suspend", "release_suspend_host",
]

if os.environ.get("GLAKE_STATS") == "1":  # publish this process's stats (glake ps / stats / top / map)
    from glake.stats import serve_from_env

    serve_from_env()
