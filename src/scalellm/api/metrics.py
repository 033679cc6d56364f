"""Prometheus metrics of the OpenAI surface: requests by endpoint and status, token
counts, latency histograms (TTFT, TPOT, e2e, queue), and the backend's engine gauges."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from scalellm.protocol.generation import GenerateChunk

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class _EngineCollector:
    def __init__(self, gauges: Callable[[], dict[str, float]]) -> None:
        self._gauges = gauges

    def collect(self):  # type: ignore[no-untyped-def]
        for name, value in self._gauges().items():
            g = GaugeMetricFamily(f"scalellm_{name}", name.replace("_", " "))
            g.add_metric([], value)
            yield g


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
        r.register(_EngineCollector(engine_gauges))

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(completion)

    def observe_chunk_timings(self, chunk: GenerateChunk) -> None:
        t = chunk.timings
        if "ttft" in t:
            self.ttft.observe(t["ttft"])
        if "tpot" in t:
            self.tpot.observe(t["tpot"])
        if "e2e" in t:
            self.e2e.observe(t["e2e"])
        if "queue" in t:
            self.queue.observe(t["queue"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
