"""The gateway in front of two real replicas (subprocesses), over gRPC."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import signal
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest

from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc
from test_server import _free_port


def _start_replica(model: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalellm.entrypoints.cli", "replica", "--model", model, "--no-http",
         "--grpc-port", str(port), "--dtype", "float32", "--block-size", "4", "--max-model-len", "256",
         "--served-model-name", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, port


def _wait_grpc(port: int, proc: subprocess.Popen) -> None:
    stub = pb_grpc.ReplicaStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        try:
            if stub.Health(pb.HealthRequest(), timeout=1).ready:
                return
        except grpc.RpcError:
            time.sleep(0.2)
    raise RuntimeError("replica not ready")


def _load(port: int) -> pb.LoadResponse:
    return pb_grpc.ReplicaStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Load(pb.LoadRequest(), timeout=5)


def _start_gateway(replica_ports: list[int], policy: str) -> tuple[subprocess.Popen, str]:
    gw_port = _free_port()
    cmd = [sys.executable, "-m", "scalellm.entrypoints.cli", "gateway", "--port", str(gw_port), "--policy", policy]
    for port in replica_ports:
        cmd += ["--replica", f"127.0.0.1:{port}"]
    gw = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{gw_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return gw, url


@pytest.fixture(scope="module")
def cluster(tiny_models):
    replicas = [_start_replica(tiny_models["llama"]) for _ in range(2)]
    for proc, port in replicas:
        _wait_grpc(port, proc)
    gw, url = _start_gateway([port for _, port in replicas], "round_robin")
    yield {"url": url, "gateway": gw, "replicas": replicas}
    for proc in [gw] + [p for p, _ in replicas]:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in [gw] + [p for p, _ in replicas]:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_gateway_never_imports_torch():
    from conftest import assert_not_imported

    assert_not_imported("import scalellm.gateway.serve, scalellm.entrypoints.cli",
                        "torch", "scalellm.engine", "scalellm.server")


def test_round_robin_spreads_and_matches_direct(cluster):
    client = openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    before = [_load(port).prefix_cache_queries for _, port in cluster["replicas"]]
    outs = [client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True}) for _ in range(4)]
    after = [_load(port).prefix_cache_queries for _, port in cluster["replicas"]]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert len({o.choices[0].text for o in outs}) == 1
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6


def test_errors_pass_through(cluster):
    r = httpx.post(f"{cluster['url']}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{cluster['url']}/v1/completions", json={"model": "tiny", "prompt": "x", "top_p": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = httpx.post(f"{cluster['url']}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404


def test_replica_death_loses_no_request(cluster):
    client = openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key="x", max_retries=0)
    victim, _ = cluster["replicas"][0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    outs = [client.completions.create(model="tiny", prompt=f"Once upon a time {i}", max_tokens=4, temperature=0)
            for i in range(6)]
    assert all(o.usage.completion_tokens >= 1 for o in outs)
    assert httpx.get(f"{cluster['url']}/ready").status_code == 200


def test_serve_with_replicas_supervises_and_drains(tiny_models):
    import psutil
    from prometheus_client.parser import text_string_to_metric_families

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--replicas", "2", "--model", tiny_models["llama"],
         "--port", str(port), "--dtype", "float32", "--block-size", "4", "--max-model-len", "256",
         "--served-model-name", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> float:
        for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            for s in fam.samples:
                if s.name == "scalellm_gateway_replicas_healthy":
                    return s.value
        return -1

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200 and healthy() == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert healthy() == 2
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200
        replicas = [p for p in psutil.Process(proc.pid).children() if "replica" in " ".join(p.cmdline())]
        assert len(replicas) == 2
        os.kill(replicas[0].pid, signal.SIGKILL)
        time.sleep(1.5)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200  # served by the survivor
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and healthy() != 2:
            time.sleep(0.3)
        assert healthy() == 2  # the supervisor restarted it
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        time.sleep(0.5)
        assert not [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 7,
                                                            "frequency_penalty": 0.5}])
def test_stream_resumes_on_another_replica(tiny_models, sampling):
    """SIGKILL a replica under load (6 concurrent greedy or seeded streams over 2 replicas):
    every client still gets one uninterrupted stream whose text equals an uninterrupted
    run, byte for byte (the tiny random model emits many byte tokens, so characters split
    across the resume boundary are exercised)."""
    import psutil

    replicas = [_start_replica(tiny_models["llama"]) for _ in range(2)]
    for proc, port in replicas:
        _wait_grpc(port, proc)
    gw, url = _start_gateway([port for _, port in replicas], "least_load")
    try:
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 240, **sampling,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        ref_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        reference = httpx.post(f"{url}/v1/completions", json=ref_body, timeout=60).json()
        num = 6
        started = threading.Barrier(num + 1)

        def run_stream() -> tuple[str, dict | None]:
            texts, usage = [], None
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if chunk["choices"]:
                        texts.append(chunk["choices"][0]["text"])
                    if len(texts) == 3:
                        started.wait(60)  # every stream is under way before the kill
            return "".join(texts), usage

        with cf.ThreadPoolExecutor(num) as pool:
            futures = [pool.submit(run_stream) for _ in range(num)]
            started.wait(60)
            # frontend_requests is counted live by the replica's frontend (no step lag)
            busy = max(replicas, key=lambda pr: _load(pr[1]).frontend_requests)
            on_victim = _load(busy[1]).frontend_requests
            assert on_victim >= 1
            psutil.Process(busy[0].pid).kill()
            results = [f.result() for f in futures]
        for text, usage in results:  # no stream lost, each identical to an uninterrupted run
            assert text == reference["choices"][0]["text"]
            assert usage["completion_tokens"] == 240 and usage["prompt_tokens"] == reference["usage"]["prompt_tokens"]
        metrics = httpx.get(f"{url}/metrics").text
        assert f"scalellm_gateway_resumed_streams_total {float(on_victim)}" in metrics
    finally:
        for proc in [gw] + [p for p, _ in replicas]:
            if proc.poll() is None:
                proc.kill()


def test_deadline_reaches_the_replica(cluster):
    live = [port for proc, port in cluster["replicas"] if proc.poll() is None]
    r = httpx.post(f"{cluster['url']}/v1/completions", timeout=30, headers={"x-deadline-ms": "40"},
                   json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_load(p).kv_blocks_used for p in live):
        time.sleep(0.05)
    assert all(_load(p).kv_blocks_used == 0 for p in live)


def test_client_disconnect_cancels_on_the_replica(cluster):
    live = [port for proc, port in cluster["replicas"] if proc.poll() is None]
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster['url']}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert any(_load(p).frontend_requests for p in live)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_load(p).kv_blocks_used or _load(p).frontend_requests for p in live):
        time.sleep(0.05)
    assert all(_load(p).kv_blocks_used == 0 and _load(p).frontend_requests == 0 for p in live)


def test_serve_default_is_gateway_plus_one_replica(tiny_models):
    """Plain `scalellm serve`: the gateway in front of one supervised replica, the same API."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalellm.entrypoints.cli", "serve", "--model", tiny_models["llama"],
         "--port", str(port), "--dtype", "float32", "--block-size", "4", "--max-model-len", "256",
         "--served-model-name", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and "gateway;dur=" in r.headers["server-timing"]
        ids = httpx.post(f"{url}/tokenize", json={"prompt": "hello world"}).json()["tokens"]
        assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"].endswith("hello world")
        assert httpx.get(f"{url}/admin/replicas").status_code == 403  # the gateway's admin API, disabled
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
