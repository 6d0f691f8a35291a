"""AsyncEngine: an :class:`~glake.serve.engine.LLMEngine` on its own thread, fed from asyncio.

One engine thread builds the engine, steps it while there is work and sleeps on its command queue
otherwise; it is the only thread that touches the engine, its scheduler and its KV cache. Requests
enter through a thread-safe queue (``add`` / ``abort`` commands, drained before every step, so an
abort frees its slot before the next step). After each step the thread posts every request's new
tokens to that request's ``asyncio.Queue`` with ``loop.call_soon_threadsafe``: the HTTP loop never
waits for a step and a step never waits for the HTTP loop.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from glake.errors import InvalidArgumentError
from glake.serve.api.metrics import ServeMetrics
from glake.serve.engine import LLMEngine
from glake.serve.sampling_params import SamplingParams
from glake.serve.sequence import Sequence


@dataclass
class CompletionDelta:
    """What one completion gained in one step (text held back while it could still be cut by a stop string)."""

    index: int
    text: str
    token_ids: List[int]
    logprobs: List[Dict[int, float]]
    finish_reason: Optional[str] = None
    full_text: Optional[str] = None  # the whole final text, once finished


@dataclass
class RequestUpdate:
    """One message to a request's queue: its completions' deltas, or the error that ended it."""

    deltas: List[CompletionDelta] = field(default_factory=list)
    finished: bool = False
    error: Optional[BaseException] = None


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request."""

    seqs: List[Sequence]
    loop: asyncio.AbstractEventLoop
    out: "asyncio.Queue[RequestUpdate]"
    arrival: float
    sent_text: List[int]
    sent_tokens: List[int]
    last_token_time: List[Optional[float]]
    first_token_time: List[Optional[float]]


class RequestHandle:
    """The asyncio side of one request: ``await handle.next()`` yields its :class:`RequestUpdate` s."""

    def __init__(self, request_id: int, num_prompt_tokens: int, out: "asyncio.Queue[RequestUpdate]") -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.finished = False
        self._out = out

    async def next(self) -> RequestUpdate:
        """The next update; raises the engine's error (an ``InvalidArgumentError`` for a refused request)."""
        u = await self._out.get()
        if u.error is not None:
            self.finished = True
            raise u.error
        self.finished = u.finished
        return u


def _settle(fut: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _post(loop: asyncio.AbstractEventLoop, out: "asyncio.Queue[RequestUpdate]", update: RequestUpdate) -> None:
    try:
        loop.call_soon_threadsafe(out.put_nowait, update)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


class AsyncEngine:
    """Runs an engine on a dedicated thread; ``submit`` / ``abort`` from any asyncio loop.

    Parameters
    ----------
    make_engine
        Builds the :class:`LLMEngine`; called on the engine thread (so the KV cache is made there).
    metrics
        Where the engine thread records latencies and counters; a new :class:`ServeMetrics` if None.
    idle_suspend_s
        Put the engine to sleep (:meth:`LLMEngine.sleep`) after this many seconds without a request,
        preparing the sleep half way (:meth:`LLMEngine.prepare_sleep`); the next request wakes it.
        None: never on its own.
    prepare_sleep
        Prepare the sleep as soon as the engine is built (on a helper thread), so that the first
        sleep (``POST /sleep``, or ``idle_suspend_s``) and its wake copy at the copy engines' speed;
        the page-locked host memory it takes is held from then on. A sleep waits for a preparation
        still running.

    Raises
    ------
    Exception
        Whatever ``make_engine`` raised (re-raised by the constructor).
    """

    def __init__(self, make_engine: Callable[[], LLMEngine], metrics: Optional[ServeMetrics] = None,
                 idle_suspend_s: Optional[float] = None, prepare_sleep: bool = False) -> None:
        self.metrics = metrics or ServeMetrics()
        self.idle_suspend_s = idle_suspend_s
        self.prepare_sleep = prepare_sleep
        self._commands: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._tracked: Dict[int, _Tracked] = {}
        self._preparing: Optional[threading.Thread] = None  # a running LLMEngine.prepare_sleep()
        self.snapshot: Dict[str, float] = {}  # replaced (never mutated) by the engine thread
        self.thread = threading.Thread(target=self._main, args=(make_engine,), name="glake-engine", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        eng = self._engine
        # read-only facts the HTTP side needs, copied once
        self.tokenizer: Any = eng.tokenizer
        self.max_model_len: int = eng.max_model_len
        self.vocab_size: int = eng.model.args.vocab_size
        self.eos_token_ids: List[int] = list(eng.eos_token_ids)

    # ---- the asyncio side ------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self.thread.is_alive()

    async def submit(self, prompt_token_ids: List[int], params: SamplingParams) -> RequestHandle:
        """Queues a request; returns once the engine thread accepted it.

        Raises
        ------
        InvalidArgumentError
            The engine refused it (see :meth:`LLMEngine.check_request`); nothing was queued.
        RuntimeError
            The engine thread is not running.
        """
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        out: "asyncio.Queue[RequestUpdate]" = asyncio.Queue()
        rid = next(self._ids)
        self._commands.put(("add", rid, list(prompt_token_ids), params, loop, out))
        first = await out.get()  # an empty update = accepted, or the refusal
        if first.error is not None:
            raise first.error
        return RequestHandle(rid, len(prompt_token_ids), out)

    def sleep_refusal(self, level: int) -> Optional[str]:
        """:meth:`LLMEngine.sleep_refusal` (reads only what the engine fixed when it was built)."""
        return self._engine.sleep_refusal(level)

    async def sleep(self, level: int = 1) -> dict:
        """:meth:`LLMEngine.sleep` on the engine thread; raises what it raises."""
        return await self._call("sleep", level)

    async def wake_up(self) -> List[int]:
        """:meth:`LLMEngine.wake_up` on the engine thread; raises what it raises."""
        return await self._call("wake_up")

    @property
    def sleeping(self) -> bool:
        """Whether the engine is asleep (the engine thread sets it before it answers what woke it)."""
        return bool(self._engine.sleeping)

    async def _call(self, name: str, *args: Any) -> Any:
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._commands.put(("call", name, args, loop, done))
        return await done

    def abort(self, request_id: int) -> None:
        """Stops a request and frees its KV slot before the next step (a no-op once it finished)."""
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Aborts everything, closes the engine (its KV cache) and joins the thread."""
        if self.alive:
            self._commands.put(("stop",))
            self.thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------------

    def _main(self, make_engine: Callable[[], LLMEngine]) -> None:
        try:
            self._engine = make_engine()
        except BaseException as e:  # handed to the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        eng = self._engine
        if self.prepare_sleep:
            self._start_preparing()
        try:
            self._publish()
            while True:
                cmds = [] if eng.has_unfinished() else self._wait_for_command()
                while True:
                    try:
                        cmds.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if not self._run_commands(cmds):
                    return
                if eng.has_unfinished():
                    try:
                        eng.step()
                    except Exception as e:  # fail every request rather than hang them
                        self._fail_all(e)
                    self._emit()
                self._publish()
        finally:
            for t in self._tracked.values():
                _post(t.loop, t.out, RequestUpdate(error=RuntimeError("the engine was shut down")))
            self._tracked.clear()
            if self._preparing is not None:
                self._preparing.join()  # it reads the allocator's layout: done before the engine goes
            eng.close()

    def _wait_for_command(self) -> List[tuple]:
        """The next command; with ``idle_suspend_s``, the engine sleeps when none came in that time.

        Half way through, a helper thread prepares the sleep (:meth:`LLMEngine.prepare_sleep`: the
        host memory of the suspend faulted in and page-locked, seconds for tens of GiB), so the sleep
        and the wake after it copy at the copy engines' speed; a request arriving meanwhile is served
        at once (the preparation takes no lock the engine needs), and the sleep waits for it."""
        idle = self.idle_suspend_s if not self._engine.sleeping else None
        if idle is None:
            return [self._commands.get()]
        try:
            return [self._commands.get(timeout=idle / 2)]
        except queue.Empty:
            pass
        # again each idle spell: the layout may have changed (what is kept already is not made again)
        self._start_preparing()
        try:
            return [self._commands.get(timeout=idle / 2)]
        except queue.Empty:
            try:
                self._sleep()
            except Exception as e:  # noqa: BLE001  (stays awake; said in the log)
                print(f"glake serve: --idle-suspend: could not sleep: {e}", flush=True)
            self._publish()
            return [self._commands.get()]

    def _start_preparing(self) -> None:
        """Runs :meth:`LLMEngine.prepare_sleep` on a helper thread, unless one is running."""
        if self._preparing is None or not self._preparing.is_alive():
            self._preparing = threading.Thread(target=self._prepare_sleep, name="glake-prepare-sleep", daemon=True)
            self._preparing.start()

    def _prepare_sleep(self) -> None:
        try:
            self._engine.prepare_sleep()
        except Exception as e:  # noqa: BLE001  (the sleep then copies into fresh memory; said in the log)
            print(f"glake serve: could not prepare the sleep: {e}", flush=True)

    def _sleep(self, level: int = 1) -> dict:
        """:meth:`LLMEngine.sleep`, once a preparation still running is done (it makes the host memory
        the sleep copies into)."""
        if self._preparing is not None:
            self._preparing.join()
        return self._engine.sleep(level)

    def _run_commands(self, cmds: List[tuple]) -> bool:
        eng = self._engine
        for c in cmds:
            if c[0] == "stop":
                return False
            if c[0] == "call":
                _, name, args, loop, done = c
                try:
                    fn = self._sleep if name == "sleep" else getattr(eng, name)
                    result, error = fn(*args), None
                except Exception as e:  # noqa: BLE001  (handed to the caller)
                    result, error = None, e
                loop.call_soon_threadsafe(_settle, done, result, error)
                continue
            if c[0] == "abort":
                t = self._tracked.pop(c[1], None)
                if t is not None:
                    eng.abort(t.seqs)
                    self.metrics.aborted.inc()
                    _post(t.loop, t.out, RequestUpdate(deltas=[CompletionDelta(s.index, "", [], [], "abort")
                                                               for s in t.seqs], finished=True))
                continue
            _, rid, ids, params, loop, out = c
            try:
                seqs = eng.add_request(ids, params)
            except InvalidArgumentError as e:
                _post(loop, out, RequestUpdate(error=e))
                continue
            n = len(seqs)
            self._tracked[rid] = _Tracked(seqs, loop, out, time.monotonic(), [0] * n, [0] * n, [None] * n, [None] * n)
            self.metrics.prompt_tokens.inc(len(ids))
            _post(loop, out, RequestUpdate())
        return True

    def _fail_all(self, error: Exception) -> None:
        for t in self._tracked.values():
            self._engine.abort(t.seqs)
            _post(t.loop, t.out, RequestUpdate(error=error))
        self._tracked.clear()

    def _emit(self) -> None:
        now = time.monotonic()
        m = self.metrics
        done = []
        for rid, t in self._tracked.items():
            deltas = []
            for i, s in enumerate(t.seqs):
                new = s.output_token_ids[t.sent_tokens[i]:]
                fin = s.is_finished
                if not new and not fin:
                    continue
                if new:
                    m.generation_tokens.inc(len(new))
                    if t.first_token_time[i] is None:
                        t.first_token_time[i] = now
                        m.ttft.observe(now - t.arrival)
                    else:
                        m.itl.observe(now - t.last_token_time[i])
                    t.last_token_time[i] = now
                text = s.text
                if fin:
                    end = len(text)
                else:  # hold back what a stop string could still cut, and a partial UTF-8 character
                    end = len(text.rstrip("\ufffd")) - max((len(x) for x in s.params.stop), default=1) + 1
                piece = text[t.sent_text[i]:end] if end > t.sent_text[i] else ""
                t.sent_text[i] = max(t.sent_text[i], end)
                lps = s.logprobs[t.sent_tokens[i]:] if s.params.logprobs is not None else []
                t.sent_tokens[i] = s.num_output_tokens
                deltas.append(CompletionDelta(s.index, piece, list(new), lps, s.finish_reason if fin else None,
                                              text if fin else None))
                if fin:
                    m.finished(s.finish_reason, now - t.arrival, t.first_token_time[i], now, s.num_output_tokens)
            all_done = all(s.is_finished for s in t.seqs)
            if deltas or all_done:
                _post(t.loop, t.out, RequestUpdate(deltas=deltas, finished=all_done))
            if all_done:
                done.append(rid)
        for rid in done:
            del self._tracked[rid]

    def _publish(self) -> None:
        eng = self._engine
        sched, kv = eng.scheduler, eng.kv
        st = kv.stats()
        capacity = st.get("chunks_budget") or kv.layout.chunks_per_slot * kv.layout.max_seqs
        pc = sched.prefix_cache
        self.snapshot = {
            "requests_running": float(len(sched.running)), "requests_waiting": float(len(sched.waiting)),
            "requests_swapped": float(len(sched.swapped)), "requests_tracked": float(len(self._tracked)),
            "kv_slots_active": float(st["slots_active"]), "kv_chunks_active": float(st["chunks_active"]),
            "kv_chunks_capacity": float(capacity), "kv_usage": float(st["chunks_active"]) / max(1, capacity),
            "preemptions": float(sched.stats.preempted_recompute + sched.stats.preempted_swap),
            "prefix_cache_hit_tokens": float(pc.hit_tokens if pc is not None else 0),
            "steps": float(sched.stats.steps), "sleeping": float(eng.sleeping),
        }
