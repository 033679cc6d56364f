"""Prometheus metrics of the OpenAI surface: requests by endpoint and status, errors by
code (rejections included), token counts, latency histograms as this server's clients
see them (TTFT, ITL, TPOT, e2e), the engine's queue time, the latency breakdown by
stage, the gateway's own overhead, and the backend's gauges."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class _EngineCollector:
    def __init__(self, gauges: Callable[[], dict[str, float]]) -> None:
        self._gauges = gauges

    def collect(self):  # type: ignore[no-untyped-def]
        """Gauges named `name` or `name{label="value"}` (one label), grouped by name."""
        families: dict[str, GaugeMetricFamily] = {}
        for key, value in self._gauges().items():
            name, _, label = key.partition("{")
            g = families.get(name)
            if g is None:
                label_names = [label.split("=", 1)[0]] if label else []
                g = families[name] = GaugeMetricFamily(f"scalellm_{name}", name.replace("_", " "), labels=label_names)
            g.add_metric([label.split("=", 1)[1].rstrip("}").strip('"')] if label else [], value)
        yield from families.values()


class APIMetrics:
    def __init__(self, engine_gauges: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("scalellm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("scalellm_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("scalellm_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("scalellm_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("scalellm_time_per_output_token_seconds", "mean time between output tokens of a request",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("scalellm_e2e_request_latency_seconds", "arrival to last token", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.queue = Histogram("scalellm_request_queue_time_seconds", "arrival to first scheduled",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("scalellm_inter_token_latency_seconds", "time between streamed chunks with tokens",
                             buckets=_TPOT_BUCKETS, registry=r)
        self.stage = Histogram("scalellm_request_stage_seconds", "latency breakdown: time in each stage of a request",
                               ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("scalellm_gateway_overhead_seconds",
                                  "gateway e2e minus the replica's own time (HTTP, routing, gRPC hop, SSE)",
                                  buckets=_OVERHEAD_BUCKETS, registry=r)
        self.errors = Counter("scalellm_errors", "error answers and rejections by code", ["code"], registry=r)
        r.register(_EngineCollector(engine_gauges))

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
