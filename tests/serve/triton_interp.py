"""Triton's CPU interpreter for the kernel tests (import this before triton, in a process of its own).

Sets ``TRITON_INTERPRET=1`` and mends one interpreter bug under numpy >= 2.4: a scalar loaded from
memory is a one-element array there, and the interpreter's ``tensor.__index__`` calls ``int()`` on it
(numpy 2.4 refuses), so ``range(start, end)`` with a loaded bound fails. Compiled kernels are untouched.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

_original = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    _original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_lang_tensor
