"""The two plain records of a benchmark: what to send (BenchRequest) and what
happened (RequestRecord). Times are time.perf_counter() seconds (monotonic).

What this module does NOT know: HTTP, how records are produced, or statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, frozen=True)
class BenchRequest:
    """One request of a workload, endpoint-independent."""

    request_id: int
    prompt: str | None  # completions prompt (or chat user text when messages is None)
    messages: list[dict[str, str]] | None  # chat messages (completions endpoints refuse these)
    input_len: int  # prompt tokens as counted by the workload's tokenizer; -1 when not counted
    output_len: int  # max_tokens asked for
    group: int = -1  # shared-prefix group, -1 when none


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it."""

    request_id: int
    endpoint: str  # endpoint label ("A", "B", or a user label)
    scheduled: float  # when the load model wanted it sent (arrival time; closed loop: worker free)
    sent: float = 0.0  # request bytes written to the socket
    headers_at: float | None = None  # response status line and headers read
    first_token_at: float | None = None  # first chunk carrying output text (streaming only)
    end: float = 0.0  # response complete (or failed)
    chunk_times: list[float] = field(default_factory=list)  # each output-carrying chunk's socket read
    status: int = 0  # HTTP status; 0 when no response
    error: str | None = None  # error type: http_4xx code, stream_error, connect, timeout, ...
    error_message: str = ""
    input_tokens: int = -1  # from usage; else the workload's count
    output_tokens: int = 0
    output_token_source: str = ""  # "usage" | "tokenizer" | "chunks"
    expected_output_len: int = 0
    text: str = ""  # output text; dropped from the JSON output unless asked for
    server_timings: dict[str, float] = field(default_factory=dict)  # ms, names normalized (see timings.py)
    is_ok: bool = False

    def to_json(self, t0: float, keep_text: bool = False) -> dict[str, Any]:
        """Plain dict; times relative to t0 in seconds, plus derived latencies in ms."""
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 6)

        out: dict[str, Any] = {
            "request_id": self.request_id, "endpoint": self.endpoint, "is_ok": self.is_ok,
            "status": self.status, "error": self.error, "error_message": self.error_message,
            "scheduled_s": rel(self.scheduled), "sent_s": rel(self.sent), "headers_s": rel(self.headers_at),
            "first_token_s": rel(self.first_token_at), "end_s": rel(self.end),
            "chunk_times_s": [round(t - t0, 6) for t in self.chunk_times],
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "output_token_source": self.output_token_source, "expected_output_len": self.expected_output_len,
            "server_timings_ms": self.server_timings,
        }
        if keep_text:
            out["text"] = self.text
        return out
