"""Mapper: the background thread that maps chunks ahead of growing sequences.

The engine's ``reserve`` (hot path) only appends a slot number to a queue and sets an event when a
sequence comes within the lookahead of its backed capacity; this thread wakes, takes the manager's
lock, and maps the next chunk(s) of the queued slots. Driver calls release the GIL, so the mapping
overlaps the engine's Python and GPU work.

- Stoppable: :meth:`stop` sets a flag, wakes the thread and joins it.
- Exception-safe: an exception escaping one pass is handed to the manager (``on_error``), which
  raises it on the next ``reserve``; the thread keeps serving later requests.
- It holds only a weak reference to the manager, so a forgotten cache can still be collected (a
  finalizer stops the thread).
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from typing import Any, Deque


class Mapper:
    """A daemon thread running ``owner._background_pass(slots)`` whenever slots are queued."""

    def __init__(self, owner: Any, name: str = "glake-kv-mapper") -> None:
        self._owner = weakref.ref(owner)
        self.queue: Deque[int] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._busy = False
        self._stop = False
        self.passes = 0
        self.busy_ns = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- engine side (any thread) --------------------------------------------------------------

    def request(self, slot: int) -> None:
        """Asks the thread to top up ``slot`` (cheap: a deque append and an event set)."""
        self.queue.append(slot)
        self._wake.set()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Blocks until the queue is empty and no pass is running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.queue or self._busy:
                if not self._thread.is_alive():
                    return not self.queue
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        """Stops the thread (after the pass in progress) and joins it. Idempotent."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop:
                return
            self._wake.clear()  # before draining: a request appended from now on sets it again
            with self._idle:
                self._busy = True
            try:
                slots = []
                while self.queue:
                    slots.append(self.queue.popleft())
                owner = self._owner()
                if owner is None:
                    return
                if slots:
                    t0 = time.perf_counter_ns()
                    try:
                        owner._background_pass(slots)
                    except BaseException as e:  # noqa: BLE001 - surfaced on the next reserve
                        owner._record_mapper_error(e)
                    self.busy_ns += time.perf_counter_ns() - t0
                    self.passes += 1
                del owner
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()

