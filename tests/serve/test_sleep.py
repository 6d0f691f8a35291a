"""``glake serve``'s sleep mode (vLLM's /sleep, /wake_up, /is_sleeping) and --idle-suspend, on a CPU server."""

from __future__ import annotations

import argparse
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.serve.api_util import API_KEY, MODEL_NAME, Server, save_tiny_chat_model  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(str(tmp_path_factory.mktemp("tiny-chat")))


def started(model_dir, tmp_path, extra=()):
    s = Server(model_dir, str(tmp_path / "serve.log"), list(extra))
    s.wait_ready()
    return s


def sleeping(c) -> bool:
    r = c.get("/is_sleeping")
    assert r.status_code == 200
    return r.json()["is_sleeping"]


def test_sleep_frees_the_kv_cache_and_a_request_wakes_the_server(model_dir, tmp_path):
    s = started(model_dir, tmp_path)
    try:
        with httpx.Client(base_url=s.url, headers=AUTH, timeout=60.0) as c:
            want = c.post("/v1/completions", json=BODY).json()["choices"][0]["text"]
            assert not sleeping(c)
            bad = c.post("/sleep", params={"level": 3})
            assert bad.status_code == 400 and "levels are 1" in bad.json()["error"]["message"]
            r = c.post("/sleep", params={"level": 1})
            assert r.status_code == 200 and r.json()["status"] == "sleeping"
            assert r.json()["kv_bytes_freed"] > 0  # the finished request's slot kept its chunks until now
            assert sleeping(c)
            assert c.post("/v1/completions", json=BODY).json()["choices"][0]["text"] == want  # woken by it
            assert not sleeping(c)
            c.post("/sleep")
            assert c.post("/wake_up").json()["status"] == "awake" and not sleeping(c)
            r = c.post("/sleep", params={"level": 2})  # the weights reloaded from the model's directory on wake
            assert r.status_code == 200 and r.json()["level"] == 2 and sleeping(c)
            assert c.post("/v1/completions", json=BODY).json()["choices"][0]["text"] == want
            assert httpx.post(s.url + "/sleep").status_code == 401  # the API key guards it
    finally:
        s.stop()


def test_sleep_with_a_request_in_flight_is_refused(model_dir, tmp_path):
    s = started(model_dir, tmp_path)
    try:
        with httpx.Client(base_url=s.url, headers=AUTH, timeout=60.0) as c:
            first = threading.Event()

            def long_stream():
                with c.stream("POST", "/v1/completions", json=dict(BODY, max_tokens=1500, stream=True,
                                                                   ignore_eos=True)) as r:
                    for _ in r.iter_lines():
                        first.set()
            t = threading.Thread(target=long_stream)
            t.start()
            assert first.wait(60)
            r = c.post("/sleep")
            assert r.status_code == 409 and "unfinished" in r.json()["error"]["message"]
            t.join(120)
            assert not sleeping(c)
    finally:
        s.stop()


def test_idle_suspend_sleeps_when_idle_and_wakes_on_a_request(model_dir, tmp_path):
    s = started(model_dir, tmp_path, ["--idle-suspend", "0.5"])
    try:
        with httpx.Client(base_url=s.url, headers=AUTH, timeout=60.0) as c:
            assert c.post("/v1/completions", json=BODY).status_code == 200
            deadline = time.monotonic() + 30
            while not sleeping(c):
                assert time.monotonic() < deadline, "the idle server never went to sleep"
                time.sleep(0.1)
            assert c.post("/v1/completions", json=BODY).status_code == 200
            assert not sleeping(c)
    finally:
        s.stop()


@pytest.fixture
def sleep_events(monkeypatch):
    """``(kind, time)`` of every ``LLMEngine.prepare_sleep`` ("prepare" at its start, "prepared" at its
    end: it is made to take 0.3 s, longer than what is left of a short idle time) and ``sleep`` call."""
    from glake.serve.engine import LLMEngine

    events = []
    prepare, sleep = LLMEngine.prepare_sleep, LLMEngine.sleep

    def slow_prepare(self):
        events.append(("prepare", time.monotonic()))
        time.sleep(0.3)
        events.append(("prepared", time.monotonic()))
        return prepare(self)

    def recorded_sleep(self, level=1):
        events.append(("sleep", time.monotonic()))
        return sleep(self, level)

    monkeypatch.setattr(LLMEngine, "prepare_sleep", slow_prepare)
    monkeypatch.setattr(LLMEngine, "sleep", recorded_sleep)
    return events


def tiny_async_engine(**kw):
    from glake.serve.api.async_engine import AsyncEngine
    from glake.serve.engine import LLMEngine
    from tests.serve.serve_util import tiny_llama

    return AsyncEngine(lambda: LLMEngine(tiny_llama(0), max_num_seqs=2, max_model_len=64), **kw)


def test_idle_suspend_prepares_the_sleep_half_way_then_sleeps(sleep_events):
    """The engine thread prepares (on a helper thread) after half the idle time, and sleeps only once
    that preparation is done; a request after the wake is served as before."""
    import asyncio

    from glake.serve import SamplingParams

    events = sleep_events
    start = time.monotonic()
    eng = tiny_async_engine(idle_suspend_s=0.4)
    try:
        deadline = time.monotonic() + 30
        while not any(e[0] == "sleep" for e in events):
            assert time.monotonic() < deadline, f"never slept: {events}"
            time.sleep(0.05)
        kinds = [e[0] for e in events]
        assert kinds[:3] == ["prepare", "prepared", "sleep"], events
        assert events[0][1] - start >= 0.2 - 0.05, "prepared before half the idle time"

        async def ask():
            h = await eng.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
            n = 0
            while not h.finished:
                n += sum(len(d.token_ids) for d in (await h.next()).deltas)
            return n
        assert asyncio.run(ask()) == 3, "the woken engine answers"
    finally:
        eng.shutdown()


def test_prepare_sleep_prepares_at_start_and_a_sleep_waits_for_it(sleep_events):
    """``prepare_sleep=True`` (``glake serve --prepare-sleep``): the preparation starts once the engine
    is built, before any request or idle time, and a sleep asked for meanwhile runs after it."""
    import asyncio

    from glake.serve.api.cli import add_parsers

    events = sleep_events
    eng = tiny_async_engine(prepare_sleep=True)
    try:
        deadline = time.monotonic() + 30
        while not any(e[0] == "prepare" for e in events):
            assert time.monotonic() < deadline, "never prepared"
            time.sleep(0.01)
        asyncio.run(eng.sleep())
        assert [e[0] for e in events] == ["prepare", "prepared", "sleep"], events
        assert eng.sleeping
    finally:
        eng.shutdown()
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    assert parser.parse_args(["serve", "--prepare-sleep"]).prepare_sleep
    assert not parser.parse_args(["serve"]).prepare_sleep
