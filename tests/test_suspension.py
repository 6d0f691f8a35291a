"""glake.suspend / glake.resume over registered components (KV caches register themselves): order,
discard=, device filtering, errors, and the retry after a failed resume. The components here are
recorders; the allocator and KV cache suspends have their own tests."""

from __future__ import annotations

import gc

import pytest

import glake
import glake.suspension as suspension
from glake.errors import InvalidArgumentError, OutOfMemoryError


class Recorder:
    def __init__(self, log, name, device=0, fail_resume=0):
        self.log, self.name, self.device_index, self.backend = log, name, device, "host"
        self.suspended = False
        self.fail_resume = fail_resume

    def suspend(self, discard=False, engine=None):
        assert engine is not None, "suspend passes the device's multipath engine"
        self.log.append(("suspend", self.name, discard))
        self.suspended = True

    def resume(self, engine=None):
        if self.fail_resume:
            self.fail_resume -= 1
            raise OutOfMemoryError(f"{self.name}: no memory yet")
        self.log.append(("resume", self.name))
        self.suspended = False


@pytest.fixture
def log(monkeypatch):
    # the host backend has one device: a stand-in for the other devices' multipath engines
    real = suspension._engine
    monkeypatch.setattr(suspension, "_engine", lambda backend, d: real(backend, d) if d == 0 else ("engine", d))
    out = []
    yield out
    for c in list(suspension._components):
        if isinstance(c, Recorder):
            suspension.unregister(c)


def test_components_suspend_with_their_discard_flag_and_resume(log):
    kv, other = Recorder(log, "kv"), Recorder(log, "other")
    suspension.register(kv)
    suspension.register(other)
    assert glake.suspend(discard=[kv]) == [0]
    assert sorted(log) == [("suspend", "kv", True), ("suspend", "other", False)]
    assert suspension.suspended()
    log.clear()
    assert glake.suspend() == []  # nothing left to suspend
    assert glake.resume() == [0]
    assert sorted(log) == [("resume", "kv"), ("resume", "other")]
    assert not suspension.suspended()


def test_device_filter(log):
    a, b = Recorder(log, "a", device=0), Recorder(log, "b", device=1)
    suspension.register(a)
    suspension.register(b)
    assert glake.suspend(device=1) == [1]
    assert log == [("suspend", "b", False)] and not a.suspended
    assert suspension.suspended(1) and not suspension.suspended(0)
    assert glake.resume(device=0) == []
    assert glake.resume(device=1) == [1] and not b.suspended


def test_discard_of_something_unregistered_is_refused_before_anything_is_suspended(log):
    kv = Recorder(log, "kv")
    suspension.register(kv)
    with pytest.raises(InvalidArgumentError, match="not registered"):
        glake.suspend(discard=[object()])
    assert log == [] and not kv.suspended


def test_a_failed_resume_leaves_it_suspended_and_a_later_one_succeeds(log):
    kv = Recorder(log, "kv", fail_resume=1)
    suspension.register(kv)
    glake.suspend()
    with pytest.raises(OutOfMemoryError):
        glake.resume()
    assert kv.suspended
    assert glake.resume() == [0] and not kv.suspended


def test_register_checks_the_interface_and_holds_weakly(log):
    with pytest.raises(InvalidArgumentError, match="no 'resume'"):
        suspension.register(type("Half", (), {"device_index": 0, "backend": "host", "suspended": False,
                                              "suspend": lambda self, discard, engine: None})())
    kv = Recorder(log, "gone")
    suspension.register(kv)
    del kv
    gc.collect()
    glake.suspend()
    assert log == []
