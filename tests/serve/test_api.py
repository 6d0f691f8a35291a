"""``glake serve`` as a real uvicorn server in a subprocess, on a tiny random Llama with a chat tokenizer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.serve.api_util import API_KEY, MODEL_NAME, ROOT, Server, metric_values, save_tiny_chat_model  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(str(tmp_path_factory.mktemp("tiny-chat")))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, str(tmp_path_factory.mktemp("log") / "serve.log"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60.0) as c:
        yield c


def metrics(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200
    return metric_values(r.text)


def wait_metrics(client, cond, timeout: float = 30.0) -> dict:
    """Polls /metrics until ``cond(values)`` holds (or fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(client)
        if cond(m):
            return m
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if k.startswith("glake_serve_num")}
        time.sleep(0.05)


def idle(m: dict) -> bool:
    return (m["glake_serve_num_requests_running"] == 0 and m["glake_serve_num_requests_waiting"] == 0
            and m["glake_serve_num_requests_in_flight"] == 0 and m["glake_serve_kv_slots_active"] == 0
            and m["glake_serve_kv_chunks_active"] == 0)


def sse_events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[len("data: "):])
    return out


def stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json=dict(body, stream=True)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_models_and_the_api_key(server, client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME] and models["data"][0]["max_model_len"] == 2048
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, server.url + path, headers=headers, json={"model": MODEL_NAME, "prompt": "a"})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_completions_stream_and_whole_give_the_offline_greedy_text(client, model_dir):
    body = {"model": MODEL_NAME, "prompt": "the cat sat", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()
    (choice,) = whole["choices"]
    assert choice["finish_reason"] == "length" and whole["object"] == "text_completion"
    assert whole["usage"] == {"prompt_tokens": 11, "completion_tokens": 24, "total_tokens": 35}
    chunks = stream(client, "/v1/completions", dict(body, stream_options={"include_usage": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == choice["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == whole["usage"]
    from glake.serve import LLM, SamplingParams

    with LLM(model_dir, device="cpu", max_num_seqs=2, max_model_len=64) as llm:
        (ref,) = llm.generate(["the cat sat"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                              use_tqdm=False)
    assert choice["text"] == ref.text


def test_chat_stream_and_whole_agree_and_use_the_chat_template(client, model_dir):
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    body = {"model": MODEL_NAME, "messages": msgs, "max_tokens": 16, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert whole["usage"]["prompt_tokens"] == len(tok.encode(prompt, add_special_tokens=False))
    (choice,) = whole["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    chunks = stream(client, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_logprobs_n_seed_and_stop(client):
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [7, 8, 9], "max_tokens": 5,
                                             "temperature": 0, "logprobs": 3, "ignore_eos": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(len(t) == 3 and max(t.values()) >= v - 1e-6 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    c = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
                                                  "temperature": 0, "ignore_eos": True}).json()
    content = c["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    body = {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 12, "n": 3, "seed": 5, "temperature": 1.0,
            "top_p": 0.9, "top_k": 50, "min_p": 0.01, "presence_penalty": 0.5, "frequency_penalty": 0.5,
            "repetition_penalty": 1.1, "ignore_eos": True}
    a, b = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert sorted(x["index"] for x in a["choices"]) == [0, 1, 2]
    assert [x["text"] for x in a["choices"]] == [x["text"] for x in b["choices"]]  # seeded
    assert a["usage"]["completion_tokens"] == 36
    full = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "abc", "max_tokens": 12,
                                                "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
    stop = full[4:6]
    cut = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "abc", "max_tokens": 12,
                                               "temperature": 0, "ignore_eos": True, "stop": [stop]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["choices"][0]["text"] == full[:full.index(stop)]
    chunks = stream(client, "/v1/completions", {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 12,
                                                "temperature": 0, "ignore_eos": True, "stop": [stop]})
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == cut["choices"][0]["text"]


LONG = "x" * 2100
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [1, 2, 5000]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "a", "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "a"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "a"}],
                              "max_tokens": 2047}, 400, "max_tokens"),
]


CASES = [(*case, False) for case in BAD] + [(p, dict(b, stream=True), s, q, True) for p, b, s, q in BAD
                                             if isinstance(b, dict)]


@pytest.mark.parametrize("path,body,status,param,streaming", CASES,
                         ids=[f"{i}-{'stream' if c[4] else 'whole'}" for i, c in enumerate(CASES)])
def test_bad_input_gets_a_4xx_openai_error(client, path, body, status, param, streaming):
    r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"  # refused before any stream starts (streaming or not)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err


def test_unknown_routes_and_methods_get_error_bodies(client):
    for r, status in ((client.get("/v1/nothing"), 404), (client.get("/v1/completions"), 405)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_disconnects_mid_stream_frees_its_kv(client):
    m0 = metrics(client)
    before, steps_before = m0.get("glake_serve_requests_aborted_total", 0.0), m0["glake_serve_engine_steps_total"]
    body = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                m = metrics(client)
                assert m["glake_serve_num_requests_running"] == 1 and m["glake_serve_kv_slots_active"] == 1
                break
    m = wait_metrics(client, lambda m: idle(m) and m["glake_serve_requests_aborted_total"] == before + 1)
    # the engine stopped stepping it: far fewer steps than its 2000 tokens (the mapper-free way to see an abort)
    assert 3 <= m["glake_serve_engine_steps_total"] - steps_before < 1000


def test_200_concurrent_requests_complete_and_leak_nothing(client, server):
    async def one(ac, i):
        if i % 2:
            body = {"model": MODEL_NAME, "prompt": f"request {i}", "max_tokens": 6, "temperature": 0.5, "seed": i,
                    "ignore_eos": True}
            r = await ac.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["completion_tokens"]
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 6,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = [e async for e in r.aiter_lines() if e.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        return json.loads(events[-2][6:])["usage"]["completion_tokens"]

    async def all_of_them():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120.0, limits=limits) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(200)))

    assert asyncio.run(all_of_them()) == [6] * 200
    wait_metrics(client, idle)


def test_metrics_parse_and_carry_the_serving_and_glake_figures(client):
    client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "abc", "max_tokens": 3, "ignore_eos": True})
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in ("glake_serve_num_requests_running", "glake_serve_num_requests_waiting", "glake_serve_kv_cache_usage_ratio",
                 "glake_serve_num_preemptions", "glake_serve_prefix_cache_hit_rate", "glake_serve_generation_tokens",
                 "glake_serve_time_to_first_token_seconds", "glake_serve_time_per_output_token_seconds",
                 "glake_serve_inter_token_latency_seconds", "glake_serve_request_success"):
        assert name in fams, name
    assert fams["glake_serve_time_to_first_token_seconds"].type == "histogram"
    count = [s.value for s in fams["glake_serve_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert count[0] >= 1
    assert any(n.startswith("glake_") and not n.startswith("glake_serve") for n in fams)  # glake.stats' figures


def test_the_openai_client_examples_run_against_the_server(server):
    pytest.importorskip("openai")
    env = dict(os.environ, OPENAI_BASE_URL=server.url + "/v1", OPENAI_API_KEY=API_KEY, GLAKE_MODEL=MODEL_NAME,
               PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "examples/client.py", "--max-tokens", "8"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert "completion:" in out.stdout and "chat (streamed):" in out.stdout
    out = subprocess.run([sys.executable, "examples/chat_client.py", "--max-tokens", "8"], input="hello\n",
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert "assistant>" in out.stdout
