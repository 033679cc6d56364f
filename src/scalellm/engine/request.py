"""A request as the engine core sees it: token ids, a status, and counters.

Knows nothing of text, tensors or devices. The scheduler moves requests between
WAITING and RUNNING; the engine appends sampled tokens and decides when they finish.

    |<------------- num_tokens = len(all_token_ids) ------------->|
    |<------- num_prompt_tokens ------->|<-- output_token_ids -->|
    |<---- num_computed_tokens ---->|   (KV for these is in the cache)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from scalellm.protocol.outputs import FinishReason
from scalellm.protocol.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # waiting again after its blocks were taken (recompute)
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_output_tokens: int  # max_tokens capped by the context length
    priority: int = 0  # lower value is served first
    arrival_time: float = field(default_factory=time.monotonic)
    # NOTE: all_token_ids is prompt + outputs in one list so that recompute after a
    # preemption and prefix hashing treat both alike.
    all_token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache on first schedule
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Hashes of this request's full blocks, in order (filled by the KV-cache manager).
    block_hashes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def sort_key(self) -> tuple[int, float]:
        """Scheduling order: priority first, then arrival (FCFS)."""
        return (self.priority, self.arrival_time)
