"""RankGroup: one process's place in a tensor x pipeline parallel job, and the collectives the model needs.

Ranks are laid out stage-major: global rank ``pp_rank * tp + tp_rank``. The ranks of one pipeline stage
form a *tensor group* (they hold the shards of the same layers and all-reduce/all-gather among
themselves); the ranks with the same ``tp_rank`` form a *pipeline group* (stage ``s`` sends its hidden
states to stage ``s + 1`` of the same group, and the last stage broadcasts the logits back along it).
A third group, all ranks over gloo, carries the control plane's Python objects (rank 0's decisions), so
that they never go through the GPU.

Backend: nccl when the device is cuda, gloo on cpu. On cuda ``NCCL_NVLS_ENABLE=0`` is put in the
environment before the process group is made (:func:`prepare_environment`; the machines this is meant for
must not use NVLink multicast), and every rank uses ``cuda:<rank>`` (one host).

The groups live in ``torch.distributed``'s default process group of this process: one RankGroup per
process at a time (:meth:`close` destroys it).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from glake.errors import InvalidArgumentError

# how long a rank waits in the control group for rank 0's next decision: an idle server sends none for
# hours, so this is long; a dead peer is noticed when its sockets close (gloo raises at once then)
CONTROL_TIMEOUT = timedelta(days=30)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the rendezvous of a one-host job)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment(device_type: str) -> None:
    """What every rank's environment needs before its process group is made: on cuda, NVLink multicast
    (NVLS) off (``NCCL_NVLS_ENABLE=0``). Children spawned afterwards inherit it."""
    if device_type == "cuda":
        os.environ["NCCL_NVLS_ENABLE"] = "0"


class RankGroup:
    """This process's rank, the job's shape, its process groups and its device.

    Parameters
    ----------
    rank
        Global rank in ``[0, tp * pp)``.
    tensor_parallel_size, pipeline_parallel_size
        The job's shape (``world_size = tp * pp``).
    port
        The TCP port on 127.0.0.1 where rank 0 holds the rendezvous store.
    device_type
        ``"cuda"`` (nccl, device ``cuda:<rank>``) or ``"cpu"`` (gloo).
    timeout_s
        How long a collective of the model (and the rendezvous) may wait for the other ranks before it
        raises.

    Raises
    ------
    InvalidArgumentError
        A size below 1, a rank out of range, an unknown device type, ``torch.distributed`` already
        initialised in this process, or fewer GPUs than ranks.
    """

    def __init__(self, rank: int, tensor_parallel_size: int, pipeline_parallel_size: int, port: int,
                 device_type: str, timeout_s: float = 120.0) -> None:
        tp, pp = int(tensor_parallel_size), int(pipeline_parallel_size)
        if tp < 1 or pp < 1:
            raise InvalidArgumentError(f"tensor_parallel_size={tp}, pipeline_parallel_size={pp}: both must be >= 1")
        world = tp * pp
        if not 0 <= rank < world:
            raise InvalidArgumentError(f"rank {rank} is not in [0, {world})")
        if device_type not in ("cuda", "cpu"):
            raise InvalidArgumentError(f"device type {device_type!r}: cuda or cpu")
        if dist.is_initialized():
            raise InvalidArgumentError("torch.distributed is already initialised in this process: one RankGroup "
                                       "(one parallel engine) per process")
        if device_type == "cuda":
            if torch.cuda.device_count() < world:
                raise InvalidArgumentError(f"{world} ranks need {world} GPUs; this host has {torch.cuda.device_count()}")
            self.device = torch.device("cuda", rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        prepare_environment(device_type)
        self.rank, self.world_size = rank, world
        self.tp_size, self.pp_size = tp, pp
        self.tp_rank, self.pp_rank = rank % tp, rank // tp
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(self.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timeout)
        try:
            # every rank makes every group, in the same order (torch.distributed's rule for new_group)
            self.cpu_group = dist.new_group(list(range(world)), backend="gloo", timeout=CONTROL_TIMEOUT)
            self.tp_group = self.pp_group = None
            for s in range(pp):
                ranks = [s * tp + t for t in range(tp)]
                g = dist.new_group(ranks, backend=self.backend, timeout=timeout)
                if rank in ranks:
                    self.tp_group, self.tp_ranks = g, ranks
            for t in range(tp):
                ranks = [s * tp + t for s in range(pp)]
                g = dist.new_group(ranks, backend=self.backend, timeout=timeout)
                if rank in ranks:
                    self.pp_group, self.pp_ranks = g, ranks
        except BaseException:
            dist.destroy_process_group()
            raise
        self.closed = False

    # ---- the job's shape -------------------------------------------------------------------------

    @property
    def is_first_stage(self) -> bool:
        """This rank's stage embeds the tokens."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank's stage applies the final norm and the lm_head."""
        return self.pp_rank == self.pp_size - 1

    def __repr__(self) -> str:
        return (f"<RankGroup rank {self.rank}/{self.world_size} tp {self.tp_rank}/{self.tp_size} "
                f"pp {self.pp_rank}/{self.pp_size} {self.backend} {self.device}>")

    # ---- tensor group ----------------------------------------------------------------------------

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums ``t`` over the tensor group, in place; returns it. Every rank gets the same bits (gloo
        and nccl reduce each element once and hand that result to all)."""
        if self.tp_size > 1 and t.numel():
            dist.all_reduce(t, group=self.tp_group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The tensor group's ``t`` s (equal shapes), concatenated along ``dim`` in tensor-rank order."""
        if self.tp_size == 1 or not t.numel():
            return t if self.tp_size == 1 else torch.cat([t] * self.tp_size, dim=dim)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.tp_size)]
        dist.all_gather(parts, t, group=self.tp_group)
        return torch.cat(parts, dim=dim)

    # ---- pipeline group --------------------------------------------------------------------------

    def send_next(self, t: torch.Tensor) -> None:
        """Sends ``t`` to the same tensor rank of the next stage (blocking until it is handed over)."""
        if self.is_last_stage:
            raise InvalidArgumentError("the last pipeline stage has no next stage")
        dist.send(t.contiguous(), dst=self.pp_ranks[self.pp_rank + 1], group=self.pp_group)

    def recv_prev(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape``/``dtype`` from the same tensor rank of the previous stage."""
        if self.is_first_stage:
            raise InvalidArgumentError("the first pipeline stage has no previous stage")
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src=self.pp_ranks[self.pp_rank - 1], group=self.pp_group)
        return t

    def broadcast_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """The last stage's ``t`` on every stage (in place: the other stages pass a buffer of its shape)."""
        if self.pp_size > 1 and t.numel():
            dist.broadcast(t, src=self.pp_ranks[-1], group=self.pp_group)
        return t

    # ---- control group (gloo, all ranks) --------------------------------------------------------

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank; the others' argument is ignored."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def gather_object(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj`` in rank order on rank 0 (None on the others)."""
        out: Optional[List[Any]] = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    # ---- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Destroys the process groups (no collective: safe when a peer is gone). Idempotent."""
        if not self.closed:
            self.closed = True
            if dist.is_initialized():
                dist.destroy_process_group()
