"""glake: GPU memory management for PyTorch users and LLM serving.

The core (``glake.core``) manages physical chunks and virtual address ranges through one of two
backends: ``cuda`` (the CUDA driver's virtual memory API) or ``host`` (the same semantics on host
memory, so everything runs and is tested without a GPU).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from glake import _C
from glake.errors import BackendUnavailableError, GlakeError, GlakeWarning, InvalidArgumentError, OutOfMemoryError

__version__ = "0.1.0"

if not _C.cuda_backend_built():
    warnings.warn("glake was built without cuda.h: only the host backend is available in this build",
                  GlakeWarning, stacklevel=2)


def backend_name(backend: Optional[str] = None) -> str:
    """The active backend: ``"cuda"`` when a GPU and driver are usable, else ``"host"``.

    ``GLAKE_BACKEND=host|cuda`` (or the ``backend`` argument) forces one; forcing ``cuda`` where it
    cannot be used raises :class:`BackendUnavailableError` with the reason.
    """
    return _C.backend_name(backend)


from glake import core  # noqa: E402  (after the warning, so it is issued once, here)
from glake.allocator import Allocator  # noqa: E402

__all__ = [
    "backend_name", "core", "Allocator", "GlakeError", "OutOfMemoryError", "InvalidArgumentError",
    "BackendUnavailableError", "GlakeWarning", "__version__",
]

if os.environ.get("GLAKE_STATS") == "1":  # publish this process's stats (glake ps / stats / top / map)
    from glake.stats import serve_from_env

    serve_from_env()
