"""The replica server in a real subprocess, driven with the official `openai` client,
httpx and raw sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--no-gateway", "--model", model,
             "--port", str(self.port),
             "--dtype", "float32", "--block-size", "4", "--max-model-len", "256", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name:
                    return s.value
        raise KeyError(name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_models):
    s = Server(tiny_models["llama"], "--served-model-name", "tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_health_ready(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").json() == {"ready": True}


def test_frontend_process_never_loads_torch(server):
    """Only the engine-core process holds torch (memory and start-up): the replica's
    frontend (HTTP, tokenizer, detokenizer) maps no libtorch."""
    import psutil

    def maps(pid: int) -> str:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            return f.read()

    front = psutil.Process(server.proc.pid)
    children = front.children(recursive=True)
    assert children, "the engine core runs in a child process"
    assert "libtorch" not in maps(front.pid)
    assert any("libtorch" in maps(c.pid) for c in children)


def test_completion_stream_equals_non_stream(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == full.choices[0].text
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12


def test_chat_stream_equals_non_stream_and_usage(server, client):
    msgs = [{"role": "user", "content": "The quick brown fox"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=10, temperature=0.7, seed=3)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    tok = httpx.post(f"{server.url}/tokenize", json={"messages": msgs}).json()
    assert usage.prompt_tokens == tok["count"] == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats (guidellm always sends it): every
    chunk carries the usage so far; counts grow one token a chunk and end at the total."""
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    with_text = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    plain = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.usage is None for c in plain if c.choices)


def test_n_and_seed(client):
    kw = dict(model="tiny", prompt="def f(x):", max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    two = client.completions.create(n=2, seed=11, **kw)
    assert sorted(c.index for c in two.choices) == [0, 1]
    again = client.completions.create(n=2, seed=11, **kw)
    assert [c.text for c in two.choices] == [c.text for c in again.choices]
    a = client.completions.create(seed=5, **kw).choices[0].text
    b = client.completions.create(seed=5, **kw).choices[0].text
    assert a == b


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt="The lazy dog", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[4:7]
    out = client.completions.create(model="tiny", prompt="The lazy dog", max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == base[: base.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_logprobs_and_echo(client):
    out = client.completions.create(model="tiny", prompt="Once upon", max_tokens=4, temperature=0, logprobs=2,
                                    echo=True, extra_body={"ignore_eos": True})
    c = out.choices[0]
    assert c.text.startswith("Once upon")
    assert len(c.logprobs.tokens) == 4 and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert lp <= max(top.values()) + 1e-6
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "prompt": "x", "max_tokens": "a"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
])
def test_errors_use_openai_format(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_context_length_error_gives_both_numbers(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1000})
    err = r.json()["error"]
    assert "1000" in err["message"] and "256" in err["message"] and err["code"] == "context_length_exceeded"


def test_malformed_json_and_chat_errors(server, client):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_bad_request_does_not_hurt_others(server, client):
    results = {}

    def good():
        results["good"] = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20,
                                                    temperature=0, extra_body={"ignore_eos": True})

    t = threading.Thread(target=good)
    t.start()
    for _ in range(10):
        httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "top_k": -7})
    t.join()
    assert results["good"].usage.completion_tokens == 20


def test_disconnect_aborts_and_frees_blocks(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
        assert server.metric("scalellm_kv_cache_blocks_used") > 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.metric("scalellm_kv_cache_blocks_used") > 0:
        time.sleep(0.05)
    assert server.metric("scalellm_kv_cache_blocks_used") == 0
    assert server.metric("scalellm_num_requests_running") == 0


def test_metrics_parse(server, client):
    client.completions.create(model="tiny", prompt="hello", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for n in ["scalellm_requests", "scalellm_time_to_first_token_seconds", "scalellm_time_per_output_token_seconds",
              "scalellm_e2e_request_latency_seconds", "scalellm_request_queue_time_seconds",
              "scalellm_prompt_tokens", "scalellm_generation_tokens", "scalellm_num_requests_waiting",
              "scalellm_kv_cache_usage_ratio", "scalellm_num_preemptions_total", "scalellm_prefix_cache_hits_total"]:
        assert n in names, n
    assert server.metric("scalellm_generation_tokens_total") >= 3


def test_engine_phase_seconds(server, client):
    """The core's time by phase: counters that grow with work, forward among them, and
    that add up to no more than the core's lifetime."""
    def phases() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        fam = next(f for f in text_string_to_metric_families(text) if f.name == "scalellm_engine_phase_seconds")
        return {s.labels["phase"]: s.value for s in fam.samples if s.name.endswith("_total")}

    before = phases()
    assert set(before) == {"schedule", "prepare", "forward", "sample", "update", "ipc", "idle"}
    t0 = time.monotonic()
    client.completions.create(model="tiny", prompt="hello there", max_tokens=8, extra_body={"ignore_eos": True})
    wall = time.monotonic() - t0
    after = phases()
    assert after["forward"] > before["forward"] and after["sample"] > before["sample"]
    assert after["schedule"] > before["schedule"] and after["ipc"] > before["ipc"]
    busy = sum(after[k] - before[k] for k in after if k != "idle")
    assert 0 < busy < wall + 0.5


def test_step_cost_and_target_metrics(server, client):
    """The scheduler's fitted step cost and the step time it aims at (serve's default goal,
    100 ms, or the 16-decode floor's time where that is longer) are exported."""
    client.completions.create(model="tiny", prompt="hello there", max_tokens=8, extra_body={"ignore_eos": True})
    text = httpx.get(f"{server.url}/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    cost = {s.labels["term"]: s.value for s in fams["scalellm_engine_step_cost_ms"].samples}
    assert set(cost) == {"per_step", "per_decode", "per_prefill_token"}
    assert all(v >= 0 for v in cost.values()) and cost["per_decode"] + cost["per_prefill_token"] > 0
    target = fams["scalellm_engine_step_target_ms"].samples[0].value
    from scalellm.engine.scheduler import MIN_BATCH, MIN_PREFILL_TOKENS

    floor = cost["per_step"] + MIN_BATCH * cost["per_decode"] + MIN_PREFILL_TOKENS * cost["per_prefill_token"]
    assert target == pytest.approx(max(100.0, floor), rel=1e-6)


def test_tokenize_detokenize(server):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "The quick brown fox"}).json()["tokens"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"] == "The quick brown fox"


def test_api_key_sigterm_drain_and_queue_full(tiny_models):
    s = Server(tiny_models["llama"], "--api-key", "sekret", "--max-pending", "1")
    try:
        assert httpx.post(f"{s.url}/v1/completions", json={"model": "x"}).status_code == 401
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0)
        name = c.models.list().data[0].id
        results: dict = {}
        started = threading.Event()

        def long():
            body = {"model": name, "prompt": "Once upon a time", "max_tokens": 240, "temperature": 0,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
            lines = []
            with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60,
                              headers={"authorization": "Bearer sekret"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started.set()
            results["long"] = lines

        t = threading.Thread(target=long)
        t.start()
        assert started.wait(30)
        r = httpx.post(f"{s.url}/v1/completions", json={"model": name, "prompt": "x"},
                       headers={"authorization": "Bearer sekret"})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert r.json()["error"]["code"] == "queue_full"
        s.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert results["long"][-1] == "data: [DONE]"
        assert '"completion_tokens":240' in results["long"][-2]
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_engine_death_is_loud(tiny_models):
    import psutil

    s = Server(tiny_models["llama"])
    try:
        lines: list[str] = []
        started = threading.Event()

        def stream():
            body = {"model": "x", "prompt": "Once upon a time", "max_tokens": 240, "stream": True, "ignore_eos": True}
            body["model"] = httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"]
            with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        core = [p for p in psutil.Process(s.proc.pid).children(recursive=True) if "python" in p.name().lower()]
        assert core
        t0 = time.monotonic()
        for p in core:
            os.kill(p.pid, signal.SIGKILL)
        t.join(30)
        # the in-flight stream ends with an OpenAI-style error event, then [DONE]
        assert any('"error"' in line and "engine" in line for line in lines), lines[-3:]
        assert lines[-1] == "data: [DONE]"
        assert s.proc.wait(30) != 0
        assert time.monotonic() - t0 < 10
    finally:
        s.stop()


def test_deadline_body_and_header_abort_the_request(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True, "deadline_ms": 30}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    body.pop("deadline_ms")
    lines = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30,
                      headers={"x-deadline-ms": "30", "x-priority": "-1"}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert any("deadline_exceeded" in line for line in lines) and lines[-1] == "data: [DONE]"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.metric("scalellm_kv_cache_blocks_used") > 0:
        time.sleep(0.05)
    assert server.metric("scalellm_kv_cache_blocks_used") == 0
    bad = httpx.post(f"{server.url}/v1/completions", json=body, headers={"x-deadline-ms": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-deadline-ms"
