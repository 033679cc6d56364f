"""The scheduler <-> worker step contract and the engine core's per-step outputs.

Plain data with lists of ints, so a step can cross a process boundary (TP ranks,
the engine-core process) without tensors. The worker keeps per-request state
(token ids, block table, sampling state) between steps; the scheduler sends a
request in full once (`NewRequestData`) and then only what changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.protocol.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the worker has not seen, or one resuming after preemption."""

    request_id: str
    all_token_ids: list[int]  # prompt + outputs produced so far (outputs > 0 after preemption)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]  # the full block table
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix hits)
    eos_token_ids: frozenset[int]  # the request's (min_tokens keeps them from being sampled)
    seed_offset: int = 0  # added to sampling_params.seed: distinct streams for n > 1


@dataclass(slots=True)
class CachedRequestData:
    """A request that was running in the previous step too."""

    request_id: str
    new_block_ids: list[int]  # appended to the worker's block table
    num_computed_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    """One step: which requests compute how many tokens."""

    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # request_id -> number of tokens to compute this step (prefill chunk or 1 decode token)
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests that ended since the last step: the worker drops their state.
    finished_request_ids: list[str] = field(default_factory=list)
    # Requests preempted in this step (blocks freed; they will come back as NewRequestData).
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class SampledLogprobs:
    sampled_logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class ModelRunnerOutput:
    """What the worker returns: one sampled token per request whose scheduled tokens
    reached the end of its known tokens (mid-prompt chunks sample nothing)."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, SampledLogprobs] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCoreOutput:
    """Per request per step, from the engine core to the frontend."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    new_logprobs: list[SampledLogprobs] | None = None
    num_cached_tokens: int = 0
    # monotonic timestamps, filled once
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0


@dataclass(slots=True)
class CoreRequest:
    """A request as the frontend hands it to the engine core (token ids, no text)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    max_output_tokens: int
    priority: int = 0
    arrival_time: float = 0.0
    seed_offset: int = 0
