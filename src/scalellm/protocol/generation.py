"""The backend contract behind the OpenAI HTTP layer: one call in, a stream of chunks out.

The replica implements it over its engine, the gateway over gRPC; the HTTP layer
(scalellm.api) is the same code for both. Plain data, no engine types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.protocol.sampling_params import SamplingParams


@dataclass(slots=True)
class GenerateCall:
    request_id: str
    model: str
    params: SamplingParams
    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat (the backend applies the template)
    add_generation_prompt: bool = True
    priority: int = 0
    deadline_unix: float = 0.0  # 0: none; past it the request is aborted end to end
    trace_id: str = ""  # the client's x-request-id (or ours): logs on every hop; need not be unique
    arrival_unix: float = 0.0  # when the first server on the path received it (latency breakdown)
    traceparent: str = ""  # W3C trace context of the caller's span, only while tracing is on (gRPC metadata)


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, token text, logprob)


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class GenerateChunk:
    choices: list[ChoiceDelta]
    prompt_text: str | None  # for echo
    num_prompt_tokens: int
    num_completion_tokens: int  # cumulative over all choices
    finished: bool
    # On the last chunk. Durations in seconds (queue, ttft, tpot, e2e) and unix stamps of
    # the request's life, each hop adding its own: routed_unix (gateway), received_unix,
    # queued_unix, first_scheduled_unix, first_token_unix, finished_unix (replica).
    timings: dict[str, float] = field(default_factory=dict)
    prompt_token_ids: list[int] | None = None  # on the first chunk (lets the gateway resume a stream)
