"""Host values to the device without waiting for the GPU.

A plain ``tensor.to("cuda")`` of pageable host memory synchronises the stream: the host waits for
every kernel queued so far before the copy returns, so a copy made after a step's forward was queued
makes the host wait for the whole forward before it can queue what follows (the logits, the sampler).
These copies go through pinned memory instead (torch's caching host allocator keeps the buffer until
the copy has run) and return at once; on the CPU they are plain copies.
"""

from __future__ import annotations

from typing import List

import torch


def tensor_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, queued on the current stream without waiting for it."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(values: List, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device`` (see :func:`tensor_to_device`)."""
    return tensor_to_device(torch.tensor(values, dtype=dtype), device)
