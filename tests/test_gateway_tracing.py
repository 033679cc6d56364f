"""OpenTelemetry tracing end to end: a client's traceparent → the gateway's span → over
gRPC metadata → the replica's child span, exported over OTLP/gRPC to a collector
stand-in (the real TraceService from opentelemetry-proto, served by this test).
Real `scalellm gateway` and `scalellm replica` processes (tiny random model).
Skipped when the `otel` extra is not installed; with tracing off nothing of
OpenTelemetry is imported, installed or not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest

from test_gateway import _wait_grpc
from test_server import _free_port

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def test_tracing_off_imports_no_opentelemetry():
    from conftest import assert_not_imported

    assert_not_imported("from scalellm.gateway.config import load_config; from scalellm.gateway.serve import build_app; "
                        "app, _ = build_app(load_config(env={}, replicas=['127.0.0.1:1'])); assert app.tracing is None",
                        "opentelemetry")


def test_otlp_endpoint_flag_then_file_then_environment(tmp_path):
    from scalellm.gateway.config import load_config

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317"}
    assert load_config(env={}).otlp_endpoint is None
    assert load_config(env=env).otlp_endpoint == "http://env:4317"
    assert load_config(env={**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317"}).otlp_endpoint \
        == "http://traces:4317"
    (tmp_path / "gw.toml").write_text('otlp_endpoint = "http://file:4317"\n')
    assert load_config(str(tmp_path / "gw.toml"), env=env).otlp_endpoint == "http://file:4317"
    assert load_config(str(tmp_path / "gw.toml"), env=env, otlp_endpoint="http://flag:4317").otlp_endpoint \
        == "http://flag:4317"


def test_serve_passes_the_endpoint_to_gateway_and_replicas():
    from scalellm.entrypoints.cli import _gateway_config, _replica_args, build_parser

    a = build_parser().parse_args(["serve", "--replicas", "2", "--otlp-endpoint", "http://c:4317"])
    assert _replica_args(a)[-2:] == ["--otlp-endpoint", "http://c:4317"]
    assert _gateway_config(a, []).otlp_endpoint == "http://c:4317"
    a = build_parser().parse_args(["gateway", "--replica", "h:1", "--otlp-endpoint", "http://c:4317"])
    assert _gateway_config(a, a.replica).otlp_endpoint == "http://c:4317"


class _Collector:
    """OTLP/gRPC trace receiver: keeps every span as a flat dict."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

        self.spans: list[dict] = []
        self._lock = threading.Lock()
        collector = self

        class Service(ts_grpc.TraceServiceServicer):
            def Export(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802 - gRPC name
                for rs in request.resource_spans:
                    resource = _attrs(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        with collector._lock:
                            collector.spans += [{
                                "service": resource.get("service.name"), "name": s.name,
                                "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                "parent_span_id": s.parent_span_id.hex(), "status": s.status.code,
                                "attributes": _attrs(s.attributes), "events": [e.name for e in s.events]}
                                for s in ss.spans]
                return ts.ExportTraceServiceResponse()

        self.port = _free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        ts_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def find(self, request_id: str, service: str) -> list[dict]:
        with self._lock:
            return [s for s in self.spans
                    if s["service"] == service and s["attributes"].get("scalellm.request_id") == request_id]


def _attrs(kvs) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@pytest.fixture(scope="module")
def traced(tiny_models):
    pytest.importorskip("opentelemetry.sdk")
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
    collector = _Collector()
    endpoint = f"http://127.0.0.1:{collector.port}"
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "50"}  # export every 50 ms, not 5 s
    env.pop("OTEL_SERVICE_NAME", None)
    rport, gport = _free_port(), _free_port()
    replica = subprocess.Popen(
        [sys.executable, "-m", "scalellm.entrypoints.cli", "replica", "--model", tiny_models["llama"], "--no-http",
         "--grpc-port", str(rport), "--dtype", "float32", "--block-size", "4", "--max-model-len", "256",
         "--served-model-name", "tiny", "--otlp-endpoint", endpoint],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    gateway = None
    try:
        _wait_grpc(rport, replica)
        gateway = subprocess.Popen(
            [sys.executable, "-m", "scalellm.entrypoints.cli", "gateway", "--port", str(gport),
             "--replica", f"127.0.0.1:{rport}", "--otlp-endpoint", endpoint],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        url = f"http://127.0.0.1:{gport}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield {"url": url, "collector": collector, "replica": f"127.0.0.1:{rport}", "gateway": gateway}
    finally:
        for proc in (gateway, replica):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (gateway, replica):
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        collector.server.stop(0)


def _wait_spans(collector: _Collector, request_id: str) -> tuple[dict, dict]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gw, rep = collector.find(request_id, "scalellm-gateway"), collector.find(request_id, "scalellm-replica")
        if gw and rep:
            assert len(gw) == 1 and len(rep) == 1, (gw, rep)
            return gw[0], rep[0]
        time.sleep(0.1)
    raise AssertionError(f"no spans for {request_id}: {collector.spans}")


def test_spans_link_client_gateway_and_replica(traced):
    r = httpx.post(f"{traced['url']}/v1/completions", timeout=60,
                   headers={"x-request-id": "otel-1", "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
                   json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    gw, rep = _wait_spans(traced["collector"], "otel-1")
    # one trace: client span → gateway span → replica span
    assert gw["trace_id"] == rep["trace_id"] == CLIENT_TRACE
    assert gw["parent_span_id"] == CLIENT_SPAN and rep["parent_span_id"] == gw["span_id"]
    assert gw["name"] == "POST /v1/completions" and rep["name"] == "scalellm.v1.Replica/Generate"
    a = gw["attributes"]
    assert a["gen_ai.request.model"] == "tiny" and a["scalellm.replica"] == traced["replica"]
    assert a["http.response.status_code"] == 200 and a["scalellm.completion_id"] == r.json()["id"]
    assert a["gen_ai.usage.output_tokens"] == 5 and a["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    timings = r.json()["usage"]["timings"]
    for stage in ("gateway", "network", "tokenize", "queue", "prefill", "decode", "return", "total", "ttft"):
        assert a[f"scalellm.latency.{stage}_ms"] == pytest.approx(timings[stage]), stage
    b = rep["attributes"]
    assert b["rpc.grpc.status_code"] == 0 and b["gen_ai.usage.output_tokens"] == 5
    assert b["scalellm.completion_id"] == a["scalellm.completion_id"] and b["scalellm.latency.ttft_ms"] > 0


def test_streamed_and_refused_requests(traced):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{traced['url']}/v1/chat/completions", json=body, headers={"x-request-id": "otel-2"},
                      timeout=60) as r:
        assert r.status_code == 200 and list(r.iter_lines())[-2] == "data: [DONE]"
    gw, rep = _wait_spans(traced["collector"], "otel-2")
    assert rep["trace_id"] == gw["trace_id"] and rep["parent_span_id"] == gw["span_id"]
    assert gw["parent_span_id"] == ""  # no client context: the gateway's span is the root
    assert gw["attributes"]["gen_ai.usage.output_tokens"] == 4 and gw["attributes"]["scalellm.latency.total_ms"] > 0
    # a client error: 400 on the gateway's span (not an error of the server), INVALID_ARGUMENT on the replica's
    r = httpx.post(f"{traced['url']}/v1/completions", headers={"x-request-id": "otel-3"}, timeout=60,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 1000})
    assert r.status_code == 400
    gw, rep = _wait_spans(traced["collector"], "otel-3")
    assert gw["attributes"]["http.response.status_code"] == 400 and gw["status"] == 0  # UNSET
    assert rep["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rep["status"] == 2 and rep["parent_span_id"] == gw["span_id"]  # ERROR


def test_probes_are_not_traced_and_sigterm_exits_0(traced):
    httpx.get(f"{traced['url']}/health")
    httpx.get(f"{traced['url']}/metrics")
    gateway = traced["gateway"]
    gateway.send_signal(signal.SIGTERM)
    assert gateway.wait(30) == 0
    names = {s["name"] for s in traced["collector"].spans}
    assert not {"GET /health", "GET /metrics"} & names
