"""The serve tests run tiny models: one torch thread (on a loaded 2-core machine OpenMP's spinning threads
made them 2-6x slower, with no gain from parallelism at these sizes)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
