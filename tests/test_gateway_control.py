"""Gateway inference control, safety and observability, as a real `scalellm gateway`
process in front of scripted replica stand-ins (real gRPC, no model): API keys, rate
limits, request limits, filters, concurrency/admission, circuit breakers, the admin
API, request-id propagation, the latency breakdown and /metrics."""

from __future__ import annotations

import concurrent.futures as cf
import pathlib
import re
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from standin import TOKEN_TEXT, StandInServer
from test_server import _free_port

ADMIN = "admin-secret"
CONFIG = """
policy = "round_robin"
[auth]
api_key_file = "{keys}"
[limits]
max_body_bytes = 8192
max_prompt_chars = 300
max_tokens = 64
max_n = 2
[rate_limits.keys.team-b]
requests_per_min = 2
[rate_limits.keys.team-c]
tokens_per_min = 10
[rate_limits.keys.team-d]
max_concurrency = 1
[admission]
max_concurrency = 6
max_queue = 0
[[filters.input]]
pattern = "forbidden"
action = "reject"
[[filters.input]]
pattern = "secretword"
action = "redact"
[[filters.output]]
pattern = "hunter2"
action = "redact"
[[filters.output]]
pattern = 'BO+M'
regex = true
max_len = 8
action = "reject"
"""
KEYS = "team-a:key-a\nteam-b:key-b\nteam-c:key-c\nteam-d:key-d\n"


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gateway not ready")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw")
    (tmp / "keys").write_text(KEYS)
    (tmp / "gw.toml").write_text(CONFIG.format(keys=tmp / "keys"))
    a, b = StandInServer(_free_port()), StandInServer(_free_port())
    port = _free_port()
    log = open(tmp / "gateway.log", "w+")
    gw = subprocess.Popen([sys.executable, "-m", "scalellm.entrypoints.cli", "--log-format", "json", "gateway",
                           "--config", str(tmp / "gw.toml"), "--port", str(port), "--admin-key", ADMIN,
                           "--replica", a.address, "--replica", b.address],
                          stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, gw)
        yield {"url": url, "a": a, "b": b, "log": tmp / "gateway.log", "proc": gw}
    finally:
        gw.terminate()
        gw.wait(30)
        a.stop()
        b.stop()


@pytest.fixture(autouse=True)
def _reset(env):
    for s in (env["a"], env["b"]):
        s.servicer.fail, s.servicer.token_delay, s.servicer.texts, s.servicer.ready = None, 0.0, None, True
    yield


def _post(env, body, key="key-a", path="/v1/completions", **kw):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    return httpx.post(env["url"] + path, json=body, headers=headers, **{"timeout": 30, **kw})


def _client(env, key="key-a"):
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key=key, max_retries=0)


def _admin(env, method, params=None, json=None, key=ADMIN):
    return httpx.request(method, env["url"] + "/admin/replicas", params=params, json=json,
                         headers={"authorization": f"Bearer {key}"}, timeout=60)


def test_api_keys(env):
    body = {"model": "fake", "prompt": "hi", "max_tokens": 2}
    r = _post(env, body, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _post(env, body, key="wrong").status_code == 401
    out = _client(env).completions.create(model="fake", prompt="hi", max_tokens=3)
    assert out.choices[0].text == TOKEN_TEXT * 3
    with pytest.raises(openai.AuthenticationError):
        _client(env, "key-a-but-longer").models.list()
    log = env["log"].read_text(encoding="utf-8")
    assert "invalid_api_key" in log and "key-a" not in log.replace("team-a", "")


def test_rate_limits_per_key(env):
    body = {"model": "fake", "prompt": "hi", "max_tokens": 2}
    codes = [_post(env, body, key="key-b").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = _post(env, body, key="key-b")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert _post(env, body, key="key-a").status_code == 200  # other keys are not affected
    # tokens/min: the first request (3 prompt + 8 completion tokens) uses up the bucket of 10
    assert _post(env, {**body, "max_tokens": 8}, key="key-c").status_code == 200
    r = _post(env, body, key="key-c")
    assert r.status_code == 429 and "tokens/min" in r.json()["error"]["message"]
    entries = [line for line in env["log"].read_text(encoding="utf-8").splitlines() if "requests_per_min" in line]
    assert entries and '"key_id":"team-b"' in entries[0] and '"request_id"' in entries[0]


def test_request_limits(env):
    r = _post(env, {"model": "fake", "prompt": "hi", "max_tokens": 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = _post(env, {"model": "fake", "prompt": "hi", "max_tokens": 2, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = _post(env, {"model": "fake", "prompt": "x" * 301, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    r = _post(env, {"model": "fake", "prompt": "x" * 9000, "max_tokens": 2})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_input_filters(env):
    r = _post(env, {"model": "fake", "prompt": "this is FORBIDDEN text", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    r = _post(env, {"model": "fake", "messages": [{"role": "user", "content": "say forbidden"}], "max_tokens": 2},
              path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    before = len(env["a"].servicer.calls) + len(env["b"].servicer.calls)
    assert _post(env, {"model": "fake", "prompt": "my secretword is x", "max_tokens": 2}).status_code == 200
    calls = env["a"].servicer.calls + env["b"].servicer.calls
    assert len(calls) == before + 1
    assert "secretword" not in str([c.prompt for c in calls]) and "[REDACTED]" in str([c.prompt for c in calls])
    r = _post(env, {"model": "fake", "prompt": [1, 2, 3], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_output_filters_streamed_and_whole(env):
    texts = ["The pass", "word is hun", "ter", "2 and more", " text."]
    for s in (env["a"], env["b"]):
        s.servicer.texts = texts
    client = _client(env)
    deltas = [c.choices[0].text for c in client.completions.create(model="fake", prompt="p", max_tokens=8,
                                                                      stream=True) if c.choices]
    assert "".join(deltas) == "The password is [REDACTED] and more text."
    assert not any("hunter" in d for d in deltas)
    whole = client.completions.create(model="fake", prompt="p", max_tokens=8)
    assert whole.choices[0].text == "The password is [REDACTED] and more text."
    # reject: the stream ends with finish_reason content_filter, text before the match kept,
    # and the replica's generation is cancelled
    for s in (env["a"], env["b"]):
        s.servicer.texts = ["all good ", "then BO", "OOM", " after"] + ["x"] * 50
        s.servicer.token_delay = 0.02
    cancelled = env["a"].servicer.cancelled + env["b"].servicer.cancelled
    chunks = [c for c in client.completions.create(model="fake", prompt="p", max_tokens=60, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == "all good then "
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    deadline = time.monotonic() + 5
    while env["a"].servicer.cancelled + env["b"].servicer.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env["a"].servicer.cancelled + env["b"].servicer.cancelled == cancelled + 1
    r = _post(env, {"model": "fake", "prompt": "p", "max_tokens": 2, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def _slow_stream(env, key, max_tokens=20):
    return _post(env, {"model": "fake", "prompt": "p", "max_tokens": max_tokens}, key=key)


def test_concurrency_limits(env):
    for s in (env["a"], env["b"]):
        s.servicer.token_delay = 0.05
    with cf.ThreadPoolExecutor(8) as pool:
        # per key: team-d may have one request in flight
        first = pool.submit(_slow_stream, env, "key-d")
        time.sleep(0.3)
        r = _slow_stream(env, "key-d", 2)
        assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit_exceeded"
        assert first.result().status_code == 200
        # global: 6 in flight, no queue -> the 7th gets 503 + Retry-After
        running = [pool.submit(_slow_stream, env, "key-a") for _ in range(6)]
        time.sleep(0.3)
        r = _slow_stream(env, "key-a", 2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
        assert "retry-after" in r.headers
        assert all(f.result().status_code == 200 for f in running)
    assert _slow_stream(env, "key-a", 2).status_code == 200


def _breaker(env, address):
    return next(r for r in _admin(env, "GET").json()["replicas"] if r["address"] == address)["breaker"]


def test_breaker_opens_and_closes(env):
    a, b = env["a"], env["b"]
    a.servicer.fail = grpc.StatusCode.INTERNAL
    client = _client(env)
    outs = [client.completions.create(model="fake", prompt="p", max_tokens=2) for _ in range(8)]
    assert all(o.choices[0].text == TOKEN_TEXT * 2 for o in outs)  # retried on b, never lost
    assert _breaker(env, a.address) in ("open", "half_open")
    n_a = len(a.servicer.calls)
    for _ in range(4):
        client.completions.create(model="fake", prompt="p", max_tokens=2)
    assert len(a.servicer.calls) == n_a  # an open breaker gets no requests
    metrics = httpx.get(env["url"] + "/metrics").text
    assert f'scalellm_gateway_replica_breaker_state{{replica="{a.address}"}}' in metrics
    a.servicer.fail = None  # recovers: probes close the breaker
    deadline = time.monotonic() + 15
    while _breaker(env, a.address) != "closed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _breaker(env, a.address) == "closed"
    for _ in range(4):
        client.completions.create(model="fake", prompt="p", max_tokens=2)
    assert len(a.servicer.calls) > n_a
    # a replica that says it is not ready is probed out too
    a.servicer.ready = False
    deadline = time.monotonic() + 15
    while _breaker(env, a.address) == "closed" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _breaker(env, a.address) != "closed"


def test_admin_add_remove(env):
    assert _admin(env, "GET", key="nope").status_code == 401
    assert _admin(env, "GET", key="key-a").status_code == 401  # API keys are not admin keys
    c = StandInServer(_free_port())
    try:
        r = _admin(env, "POST", json={"address": c.address, "pool": "extra"})
        assert r.status_code == 201 and r.json()["pool"] == "extra"
        assert _admin(env, "POST", json={"address": c.address}).status_code == 409
        assert _admin(env, "POST", json={"address": "no-port"}).status_code == 400
        deadline = time.monotonic() + 10
        while not next(x for x in _admin(env, "GET").json()["replicas"] if x["address"] == c.address)["healthy"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        client = _client(env)
        for _ in range(6):
            client.completions.create(model="fake", prompt="p", max_tokens=2)
        assert c.servicer.calls  # the new replica takes traffic
        # removal drains: a stream running on it finishes
        c.servicer.token_delay = 0.05
        with cf.ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(_slow_stream, env, "key-a") for _ in range(3)]
            time.sleep(0.3)
            assert c.servicer.active >= 1
            r = _admin(env, "DELETE", params={"address": c.address})
            assert r.status_code == 200 and r.json()["drained"] is True
            assert all(s.result().status_code == 200 for s in streams)
        assert c.address not in [x["address"] for x in _admin(env, "GET").json()["replicas"]]
        assert _admin(env, "DELETE", params={"address": c.address}).status_code == 404
    finally:
        c.stop()


def test_request_id_and_latency_breakdown(env):
    r = _post(env, {"model": "fake", "prompt": "p", "max_tokens": 4}, headers={"x-request-id": "trace-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-123"
    calls = env["a"].servicer.calls + env["b"].servicer.calls
    assert any(c.trace_id == "trace-123" for c in calls)
    timing = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    for stage in ("gateway", "network", "tokenize", "queue", "prefill", "decode", "return", "total", "overhead"):
        assert stage in timing, timing
    usage = r.json()["usage"]
    assert usage["timings"]["total"] == pytest.approx(float(timing["total"]))
    assert usage["timings"]["total"] >= usage["timings"]["decode"]
    stream = _client(env).chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, stream=True, stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.usage.completion_tokens == 4 and last.usage.model_extra["timings"]["total"] > 0


def test_metrics(env):
    list(_client(env).completions.create(model="fake", prompt="p", max_tokens=5, stream=True))
    text = httpx.get(env["url"] + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("scalellm_inter_token_latency_seconds_count", ())] >= 4
    assert samples[("scalellm_gateway_overhead_seconds_count", ())] >= 1
    assert samples[("scalellm_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("scalellm_request_stage_seconds_count", (("stage", "decode"),))] >= 1
    assert samples[("scalellm_gateway_replicas_healthy", ())] >= 1
    assert any(name == "scalellm_errors_total" and dict(labels).get("code") == "invalid_api_key"
               for name, labels in samples)
    assert any(name == "scalellm_gateway_replica_requests_total" for name, _ in samples)


def test_disconnect_cancels_a_non_streamed_request(env):
    """A client that gives up on a non-streamed request cancels it on the replica at once,
    as a streaming client does (not when the generation would have finished)."""
    for s in (env["a"], env["b"]):
        s.servicer.token_delay = 0.05  # 60 tokens: 3 s
    cancelled = env["a"].servicer.cancelled + env["b"].servicer.cancelled
    t0 = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        _post(env, {"model": "fake", "prompt": "p", "max_tokens": 60}, timeout=0.5)
    deadline = time.monotonic() + 5
    while env["a"].servicer.cancelled + env["b"].servicer.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env["a"].servicer.cancelled + env["b"].servicer.cancelled == cancelled + 1
    assert time.monotonic() - t0 < 2.0
    assert env["a"].servicer.active + env["b"].servicer.active == 0


def test_unimplemented_on_the_replica_is_501(env):
    """The stand-ins do not implement Detokenize: the replica's UNIMPLEMENTED reaches the
    client as 501 in OpenAI's error format, not as an internal error."""
    r = _post(env, {"tokens": [1, 2, 3]}, path="/detokenize")
    assert r.status_code == 501, r.text
    err = r.json()["error"]
    assert err["type"] == "not_implemented_error" and err["code"] == "not_implemented"


DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gateway.md"


def test_docs_example_config_loads(tmp_path):
    """docs/gateway.md's complete example file and key file are accepted as written."""
    from scalellm.api.safety import ContentFilter, parse_keys
    from scalellm.gateway.config import load_config
    from scalellm.gateway.routing import make_policy

    text = DOCS.read_text(encoding="utf-8")
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    keys_example = text.split("```text\n# /etc/scalellm/keys\n", 1)[1].split("```", 1)[0]
    assert [k.key_id for k in parse_keys(keys_example)] == ["web-app", "batch-team"]
    (tmp_path / "keys").write_text(keys_example)
    (tmp_path / "gateway.toml").write_text(example.replace("/etc/scalellm/keys", str(tmp_path / "keys")))
    config = load_config(str(tmp_path / "gateway.toml"), env={})
    assert config.policy == "adaptive" and config.port == 8000 and config.otlp_endpoint == "http://127.0.0.1:4317"
    assert [r.pool for r in config.replicas] == ["latency"] + ["throughput"] * 4 + ["default"]
    policy = make_policy(config.policy, **config.policy_options)
    assert policy.pool_for(31) == "latency" and policy.pool_for(32) == "throughput"
    batch = next(k for k in config.safety.keys if k.key_id == "batch-team")
    assert batch.limits.max_concurrency == 64 and config.safety.default_key_limits.requests_per_min == 600
    assert config.safety.limits.max_tokens == 4096 and config.admission.max_queue == 1024
    assert ContentFilter(config.safety.input_filters).apply("card 1234567812345678 ok") == "card [REDACTED] ok"
    assert ContentFilter(config.safety.output_filters).apply("ssn 123-45-6789") == "ssn [REDACTED]"


def test_docs_name_every_metric(env):
    """docs/gateway.md lists exactly the metric names the gateway exports."""
    _post(env, {"model": "fake", "prompt": "p", "max_tokens": 2}, key="wrong")  # an error
    list(_client(env).completions.create(model="fake", prompt="p", max_tokens=5, stream=True))
    exported = set()
    for family in text_string_to_metric_families(httpx.get(env["url"] + "/metrics").text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                exported.add(re.sub(r"_(bucket|sum|count)$", "", sample.name))
    documented = set(re.findall(r"`(scalellm_[a-z0-9_]+)", DOCS.read_text(encoding="utf-8")))
    assert documented == exported, (documented - exported, exported - documented)
