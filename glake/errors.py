"""The errors glake raises.

``GlakeError`` (a ``RuntimeError``) is the base of them all:

- ``OutOfMemoryError`` (also a ``MemoryError``): physical memory or a configured limit is exhausted;
- ``InvalidArgumentError`` (also a ``ValueError``): bad sizes, offsets, handles or state;
- ``BackendUnavailableError``: the requested backend cannot be used on this machine.

A failing driver call's message names the call, its arguments and the driver's error name, e.g.
``cuMemMap(va=0x7f..., size=2097152, handle=0x...) failed: CUDA_ERROR_INVALID_VALUE``.
"""

from glake._C import BackendUnavailableError, GlakeError, InvalidArgumentError, OutOfMemoryError


class GlakeWarning(UserWarning):
    """Something about this glake build or machine that the user should know."""


__all__ = ["GlakeError", "OutOfMemoryError", "InvalidArgumentError", "BackendUnavailableError", "GlakeWarning"]
