"""Optional OpenTelemetry tracing: one span per request on each hop, linked by W3C
trace context.

    client ──traceparent header──► gateway: span "POST /v1/chat/completions" (SERVER)
                                     │ gRPC metadata `traceparent` (this span's context)
                                     ▼
                                   replica: span "scalellm.v1.Replica/Generate" (SERVER, its child)

Off unless an OTLP endpoint is configured (`--otlp-endpoint URL`, or the standard
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, resolved by the
callers' configuration with `otlp_endpoint`). Off, this module imports nothing of
OpenTelemetry and the callers hold `None` instead of a Tracing: the request path pays
one `is None` test per request, nothing per chunk. On, the `otel` extra must be
installed (`pip install 'scalellm[otel]'`); spans go out in batches over OTLP/gRPC from
a background thread (the SDK's BatchSpanProcessor; its OTEL_BSP_* and the exporter's
OTEL_EXPORTER_OTLP_* settings apply), and the span of the request in hand is also in
a context variable, so the gateway's backend can name the replica it chose.

Knows nothing of backends, replicas or engines; the tracer provider is this object's
own (never OpenTelemetry's global one).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from scalellm.protocol.errors import ScaleLLMError

_current: ContextVar[RequestSpan | None] = ContextVar("scalellm_request_span", default=None)


def otlp_endpoint(flag: str | None, env: Mapping[str, str]) -> str | None:
    """The OTLP/gRPC endpoint to export to: the flag, else the standard variables."""
    return flag or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def current_span() -> RequestSpan | None:
    """The span of the request this task serves (only ever set while tracing is on)."""
    return _current.get()


class Tracing:
    """A tracer for one process (`service_name` unless OTEL_SERVICE_NAME says otherwise).
    `exporter`: any SpanExporter (tests); default OTLP over gRPC to `endpoint`."""

    def __init__(self, service_name: str, endpoint: str | None = None, exporter: Any = None) -> None:
        try:
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
            if exporter is None:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=endpoint)
        except ImportError as e:
            raise ScaleLLMError(f"tracing to {endpoint} needs OpenTelemetry: pip install 'scalellm[otel]' "
                                f"({e})") from None
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("scalellm")
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind = SpanKind.SERVER
        self._status = (Status, StatusCode)

    def start(self, name: str, start_unix: float, traceparent: str | None,
              attributes: dict[str, Any]) -> RequestSpan:
        """A request's span, the child of `traceparent` when it is a valid W3C header,
        and the current span of the calling task."""
        context = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        span = self._tracer.start_span(name, context=context, kind=self._server_kind,
                                       start_time=int(start_unix * 1e9), attributes=attributes)
        request_span = RequestSpan(span, self._status)
        _current.set(request_span)
        return request_span

    def shutdown(self) -> None:
        """Export what is pending and stop."""
        self._provider.shutdown()


class RequestSpan:
    """One request's span. Attributes are collected here and handed to the SDK in one
    call when the span ends (the SDK takes a lock and validates per call)."""

    __slots__ = ("_span", "_status", "_attributes", "traceparent")

    def __init__(self, span: Any, status: tuple[Any, Any]) -> None:
        self._span = span
        self._status = status
        self._attributes: dict[str, Any] = {}
        ctx = span.get_span_context()
        # W3C trace context of this span, for the next hop
        self.traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def set(self, key: str, value: Any) -> None:
        self._attributes[key] = value

    def event(self, name: str, **attributes: Any) -> None:
        self._span.add_event(name, attributes)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._attributes["gen_ai.usage.input_tokens"] = prompt_tokens
        self._attributes["gen_ai.usage.output_tokens"] = completion_tokens

    def latency(self, breakdown_ms: Mapping[str, float]) -> None:
        """The request's latency breakdown (milliseconds), one attribute per part."""
        for name, ms in breakdown_ms.items():
            self._attributes[f"scalellm.latency.{name}_ms"] = ms

    def fail(self, description: str) -> None:
        status, code = self._status
        self._span.set_status(status(code.ERROR, description))

    def end(self) -> None:
        self._span.set_attributes(self._attributes)
        self._span.end()
