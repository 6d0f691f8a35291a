"""ParallelEngine: one engine over ``tp x pp`` ranks (tensor and pipeline parallelism), SPMD.

Every rank owns an ordinary :class:`~glake.serve.engine.LLMEngine` over its own shard of the model
(:func:`~glake.serve.tensor_parallel.shard`, :class:`~glake.serve.pipeline_parallel.PipelineStage`) and
its own KV cache (its KV heads of its layers). Rank 0 is the engine users talk to, in their process;
it spawns ranks ``1..world-1`` (``torch.multiprocessing``, the spawn start method, a free port on
127.0.0.1 for the rendezvous). Every decision that changes the engines' state is a command rank 0
broadcasts over the gloo control group (:meth:`RankGroup.broadcast_object`) and every rank applies to
its engine in the same order — a request added (token ids, and a seed rank 0 chose when the request
had none and samples, so that every rank draws the same tokens), aborts, sleep / wake-up, more EOS
tokens, and each step. Since every rank then runs the same scheduler over the same requests and the
model's collectives give every rank the same logits, the engines stay identical without any other
exchange; rank 0's sequences are the outputs.

Commands that need no collective (add, abort, sleep, ...) are applied on rank 0 first and broadcast
only if they succeeded, so an error the user gets (a refused request, a sleep with requests running)
never reaches the other ranks. A step is broadcast first (the ranks compute it together). A worker
whose engine raises anyway has diverged: it prints the traceback and exits, and rank 0's next call
raises a :class:`~glake.errors.GlakeError` naming it.

Lifetime: :meth:`close` (also the context manager and an ``atexit`` hook) stops the workers and joins
them, terminating any that do not exit within ``timeout_s``. A dead worker makes every later call raise
at once (its exit code is checked before each command; a collective in flight fails when its sockets
close, or after ``timeout_s``). Workers exit on their own when rank 0's process dies.

Like every ``spawn`` user, a script that builds a ParallelEngine must guard its entry point with
``if __name__ == "__main__":`` (the children import the parent's main module).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence as Seq, Tuple, Union

import torch

from glake.errors import GlakeError, InvalidArgumentError
from glake.serve.engine import LLMEngine
from glake.serve.models.loader import LoadedModel, load_model
from glake.serve.pipeline_parallel import PipelineStage, split_layers
from glake.serve.ranks import RankGroup, free_port, prepare_environment
from glake.serve.sampling_params import SamplingParams
from glake.serve.sequence import Sequence
from glake.serve.tensor_parallel import check_shardable, shard


@dataclass
class _RankSpec:
    """What every rank needs to build its engine (pickled to the spawned ranks)."""

    model: Any
    tokenizer: Any
    tp: int
    pp: int
    device_type: str
    port: int
    timeout_s: float
    engine_args: Dict[str, Any]


def _build_engine(loaded: LoadedModel, spec: _RankSpec, group: RankGroup) -> LLMEngine:
    """This rank's engine: ``loaded`` (the full model) cut to the rank's shard and stage."""
    model = shard(loaded.model, group)
    if spec.pp > 1:
        model = PipelineStage(model, group)
    loaded = dataclasses.replace(loaded, model=model)
    return LLMEngine(loaded, spec.tokenizer, device=group.device, **spec.engine_args)


class _Replica:
    """One rank's engine and the table that names its requests the same way on every rank."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.requests: Dict[int, List[Sequence]] = {}

    def apply(self, cmd: Tuple) -> Any:
        """Applies one of rank 0's commands to this rank's engine; returns the engine's result."""
        kind, eng = cmd[0], self.engine
        if kind == "step":
            out = eng.step()
            self._prune()
            return out
        if kind == "add":
            seqs = eng.add_request(cmd[1], cmd[2])
            self.requests[seqs[0].request_id] = seqs
            return seqs
        if kind == "abort":
            seqs = [self.requests[rid][i] for rid, i in cmd[1] if rid in self.requests]
            n = eng.abort(seqs)
            self._prune()
            return n
        if kind == "drain":
            out = eng.drain()
            self._prune()
            return out
        if kind == "sleep":
            return eng.sleep(cmd[1])
        if kind == "wake_up":
            return eng.wake_up()
        if kind == "eos":
            return eng.add_eos_token_ids(cmd[1])
        raise InvalidArgumentError(f"unknown parallel engine command {kind!r}")

    def _prune(self) -> None:
        done = [rid for rid, seqs in self.requests.items() if all(s.is_finished for s in seqs)]
        for rid in done:
            del self.requests[rid]


def _watch_parent() -> None:
    """Exits this worker when rank 0's process is gone (so that no rank outlives it)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    while parent is not None and parent.is_alive():
        time.sleep(1.0)
    os._exit(3)


def _worker_main(rank: int, spec: _RankSpec) -> None:
    """A spawned rank: build its engine, report, then apply rank 0's commands until ``stop``."""
    threading.Thread(target=_watch_parent, name="glake-parent-watch", daemon=True).start()
    torch.set_num_threads(max(1, torch.get_num_threads() // (spec.tp * spec.pp)))
    group = RankGroup(rank, spec.tp, spec.pp, spec.port, spec.device_type, spec.timeout_s)
    replica, status = None, None
    try:
        loaded = load_model(spec.model, group.device, spec.engine_args.get("dtype"))
        replica = _Replica(_build_engine(loaded, spec, group))
    except Exception as e:  # noqa: BLE001  (reported to rank 0, which raises it)
        status = f"{type(e).__name__}: {e}"
    group.gather_object(status)
    code = 0
    try:
        while replica is not None:
            cmd = group.broadcast_object()
            if cmd[0] == "stop":
                break
            try:
                replica.apply(cmd)
            except Exception:  # noqa: BLE001  rank 0 applied it without error: this rank diverged
                print(f"glake parallel engine: rank {rank} failed on {cmd[0]!r}; exiting:", file=sys.stderr)
                traceback.print_exc()
                code = 1
                break
    finally:
        if replica is not None:
            replica.engine.close()
        group.close()
    if code or status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 1)


def _device_type(device: Union[None, str, torch.device], world: int) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda" and d.index not in (None, 0):
        raise InvalidArgumentError(f"device={device!r}: a parallel engine's ranks use cuda:0..cuda:{world - 1}; "
                                   f"pass 'cuda' (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if d.type not in ("cuda", "cpu"):
        raise InvalidArgumentError(f"device={device!r}: cuda or cpu")
    return d.type


class ParallelEngine:
    """An :class:`LLMEngine` spread over ``tensor_parallel_size * pipeline_parallel_size`` ranks.

    It has the engine's interface (``add_request``, ``step``, ``abort``, ``sleep``, ``wake_up``, ...), so
    :class:`~glake.serve.LLM` and the server use it as they use an :class:`LLMEngine`.

    Parameters
    ----------
    model, tokenizer
        As for :class:`LLMEngine` (a directory, or an in-memory ``transformers`` model, which is pickled to
        the other ranks). Every rank loads the full checkpoint and keeps its shard.
    tensor_parallel_size
        Ranks per pipeline stage; they split heads, MLP width and vocabulary (:mod:`~glake.serve.tensor_parallel`).
    pipeline_parallel_size
        Pipeline stages; they split the layers (:mod:`~glake.serve.pipeline_parallel`).
    device
        ``"cuda"`` (rank ``r`` on ``cuda:r``, nccl) or ``"cpu"`` (gloo); default cuda if present.
    timeout_s
        How long a rank waits for the others in the rendezvous, a model collective, or at shutdown.
    **engine_args
        :class:`LLMEngine`'s other keywords, the same on every rank. ``cuda_graphs=True`` is refused
        (CUDA graphs per rank are not implemented; they are off).

    Raises
    ------
    InvalidArgumentError
        Bad sizes, a model that does not split that way (heads or MLP width not divisible by
        ``tensor_parallel_size``, more stages than layers), more ranks than GPUs, or whatever a rank's
        :class:`LLMEngine` refused.
    GlakeError
        A rank failed to start.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, device: Union[None, str, torch.device] = None,
                 timeout_s: float = 120.0, **engine_args: Any) -> None:
        tp, pp = int(tensor_parallel_size), int(pipeline_parallel_size)
        if tp < 1 or pp < 1:
            raise InvalidArgumentError(f"tensor_parallel_size={tensor_parallel_size}, pipeline_parallel_size="
                                       f"{pipeline_parallel_size}: both must be >= 1")
        world = tp * pp
        device_type = _device_type(device, world)
        if device_type == "cuda" and torch.cuda.device_count() < world:
            raise InvalidArgumentError(f"tensor_parallel_size * pipeline_parallel_size = {tp} * {pp} = {world} "
                                       f"ranks need {world} GPUs; {torch.cuda.device_count()} visible")
        if engine_args.get("cuda_graphs"):
            raise InvalidArgumentError("cuda_graphs=True: CUDA graphs are not implemented for a parallel engine "
                                       "(the collectives would have to be captured per rank)")
        engine_args["cuda_graphs"] = False
        if torch.distributed.is_initialized():
            raise InvalidArgumentError("torch.distributed is already initialised in this process: a parallel "
                                       "engine needs its own process group (one per process)")
        self.tensor_parallel_size, self.pipeline_parallel_size, self.world_size = tp, pp, world
        self.timeout_s = float(timeout_s)
        self.closed = False
        self._failure: Optional[str] = None
        self._procs: List[Any] = []
        self._serving = False
        self.group: Optional[RankGroup] = None
        # rank 0 loads first: a model that cannot be split fails here, before any process is spawned
        loaded = load_model(model, "cuda:0" if device_type == "cuda" else "cpu", engine_args.get("dtype"))
        check_shardable(loaded.model.args, tp)
        split_layers(loaded.model.args.num_layers, pp)
        spec = _RankSpec(model, tokenizer, tp, pp, device_type, free_port(), self.timeout_s, dict(engine_args))
        prepare_environment(device_type)
        ctx = torch.multiprocessing.get_context("spawn")
        self._replica: Optional[_Replica] = None
        try:
            for rank in range(1, world):
                p = ctx.Process(target=_worker_main, args=(rank, spec), name=f"glake-rank-{rank}", daemon=True)
                p.start()
                self._procs.append(p)
            self.group = RankGroup(0, tp, pp, spec.port, device_type, self.timeout_s)
            error = None
            try:
                self._replica = _Replica(_build_engine(loaded, spec, self.group))
            except Exception as e:  # noqa: BLE001  the others report theirs first; then this is raised
                error = e
            del loaded
            statuses = self.group.gather_object(None)
            self._serving = True  # the ranks that started now wait for commands (close sends them "stop")
            if error is not None:
                raise error
            bad = [f"rank {r}: {s}" for r, s in enumerate(statuses) if s is not None]
            if bad:
                raise GlakeError("parallel engine: ranks failed to start: " + "; ".join(bad))
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    # ---- what the API reads (rank 0's engine) ----------------------------------------------------

    @property
    def engine(self) -> LLMEngine:
        """Rank 0's :class:`LLMEngine` (read it; change it only through this object)."""
        if self._replica is None:
            raise GlakeError("the parallel engine is closed")
        return self._replica.engine

    @property
    def model(self):
        """Rank 0's shard (``model.args.vocab_size`` is the full vocabulary)."""
        return self.engine.model

    @property
    def config(self) -> Any:
        return self.engine.config

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def eos_token_ids(self) -> List[int]:
        return self.engine.eos_token_ids

    @property
    def scheduler(self):
        """Rank 0's scheduler (every rank's is the same)."""
        return self.engine.scheduler

    @property
    def kv(self):
        """Rank 0's KV cache (its KV heads of its stage's layers)."""
        return self.engine.kv

    @property
    def sleeping(self) -> bool:
        return self.engine.sleeping

    @property
    def worker_pids(self) -> List[int]:
        """The spawned ranks' process ids (ranks 1..world-1)."""
        return [p.pid for p in self._procs]

    def encode(self, prompt: Union[str, Seq[int]]) -> List[int]:
        """See :meth:`LLMEngine.encode`."""
        return self.engine.encode(prompt)

    def check_request(self, prompt: Union[str, Seq[int]], params: SamplingParams) -> List[int]:
        """See :meth:`LLMEngine.check_request` (nothing is broadcast)."""
        return self.engine.check_request(prompt, params)

    def has_unfinished(self) -> bool:
        """True while any request is not finished."""
        return self.engine.has_unfinished()

    # ---- commands --------------------------------------------------------------------------------

    def add_request(self, prompt: Union[str, Seq[int]], params: SamplingParams) -> List[Sequence]:
        """See :meth:`LLMEngine.add_request`. A sampled request without a seed gets one chosen here (it is
        in the returned sequences' ``params``): every rank must draw the same tokens."""
        ids = self.engine.check_request(prompt, params)
        if params.seed is None and not params.greedy:
            params = dataclasses.replace(params, seed=secrets.randbits(62))
        return self._local_then_broadcast(("add", ids, params))

    def abort(self, seqs: Seq[Sequence]) -> int:
        """See :meth:`LLMEngine.abort`."""
        return self._local_then_broadcast(("abort", [(s.request_id, s.index) for s in seqs]))

    def drain(self) -> List[Sequence]:
        """See :meth:`LLMEngine.drain`."""
        return self._local_then_broadcast(("drain",))

    def sleep_refusal(self, level: int) -> Optional[str]:
        """See :meth:`LLMEngine.sleep_refusal`; level 2 is not built for parallel engines."""
        if level == 2:
            return ("sleep level 2 is not built for tensor or pipeline parallelism (each rank would reload and "
                    "re-shard its checkpoint): use level 1")
        return self.engine.sleep_refusal(level)

    def sleep(self, level: int = 1) -> Dict[str, Any]:
        """See :meth:`LLMEngine.sleep` (every rank sleeps; rank 0's figures are returned)."""
        why = self.sleep_refusal(level)
        if why:
            raise InvalidArgumentError(why)
        return self._local_then_broadcast(("sleep", level))

    def wake_up(self) -> List[int]:
        """See :meth:`LLMEngine.wake_up` (every rank wakes; rank 0's devices are returned)."""
        return self._local_then_broadcast(("wake_up",))

    def add_eos_token_ids(self, ids: Seq[int]) -> None:
        """See :meth:`LLMEngine.add_eos_token_ids`."""
        self._local_then_broadcast(("eos", [int(i) for i in ids]))

    def step(self) -> List[Sequence]:
        """One step on every rank; returns rank 0's finished sequences (see :meth:`LLMEngine.step`).

        Raises
        ------
        GlakeError
            A rank is gone or a collective failed / timed out (the engine is unusable then: close it).
        """
        self._check_ranks()
        try:
            self.group.broadcast_object(("step",))
            return self._replica.apply(("step",))
        except GlakeError:
            raise  # the engine's own errors (every rank raised the same)
        except RuntimeError as e:  # torch.distributed's: a peer closed its sockets, or a timeout
            self._check_ranks()
            self._failure = f"a collective failed ({e})"
            raise GlakeError(f"parallel engine: a collective failed: {e}") from e

    def _local_then_broadcast(self, cmd: Tuple) -> Any:
        self._check_ranks()
        result = self._replica.apply(cmd)  # raises before anything is broadcast
        try:
            self.group.broadcast_object(cmd)
        except RuntimeError as e:
            self._check_ranks()
            self._failure = f"a broadcast failed ({e})"
            raise GlakeError(f"parallel engine: broadcasting {cmd[0]!r} failed: {e}") from e
        return result

    def _check_ranks(self) -> None:
        """Raises if the engine is closed or broken, or a spawned rank exited."""
        if self.closed:
            raise GlakeError("the parallel engine is closed")
        for rank, p in enumerate(self._procs, start=1):
            if p.exitcode is not None:
                self._failure = f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        if self._failure is not None:
            raise GlakeError(f"parallel engine is unusable: {self._failure}; close it")

    # ---- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops every rank (its engine and KV cache closed), joins the spawned processes — terminating
        those that do not exit within ``timeout_s`` (2 s when a rank already failed) — and destroys the
        process groups. Idempotent; also run at exit."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        healthy = self._serving and self._failure is None and all(p.exitcode is None for p in self._procs)
        if healthy:
            try:
                self.group.broadcast_object(("stop",))
            except RuntimeError:
                healthy = False
        if self._replica is not None:
            self._replica.engine.close()
            self._replica = None
        wait = self.timeout_s if healthy else 2.0
        deadline = time.monotonic() + wait
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        if self.group is not None:
            self.group.close()

    def __enter__(self) -> "ParallelEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_engine(model: Any, tokenizer: Any = None, *, tensor_parallel_size: int = 1,
                  pipeline_parallel_size: int = 1, **engine_args: Any) -> Union[LLMEngine, ParallelEngine]:
    """An :class:`LLMEngine` in this process when ``tensor_parallel_size * pipeline_parallel_size == 1``,
    else a :class:`ParallelEngine` over that many ranks (what :class:`~glake.serve.LLM` and ``glake serve``
    build).

    Raises
    ------
    InvalidArgumentError
        See :class:`LLMEngine` and :class:`ParallelEngine`.
    """
    tp, pp = int(tensor_parallel_size), int(pipeline_parallel_size)
    if tp < 1 or pp < 1:
        raise InvalidArgumentError(f"tensor_parallel_size={tensor_parallel_size}, pipeline_parallel_size="
                                   f"{pipeline_parallel_size}: both must be >= 1")
    if tp * pp == 1:
        engine_args.pop("timeout_s", None)  # the ranks' timeout: nothing to wait for in one process
        return LLMEngine(model, tokenizer, **engine_args)
    return ParallelEngine(model, tokenizer, tensor_parallel_size=tp, pipeline_parallel_size=pp, **engine_args)
