"""Per-request sampling parameters, validated once at construction.

This module knows nothing of tensors or tokenizers: it is plain data that crosses
process boundaries (msgspec/pickle friendly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.protocol.errors import InvalidParameterError

MAX_LOGPROBS = 20


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    bad = value <= lo if lo_open else value < lo
    if bad or value > hi:
        left = "(" if lo_open else "["
        raise InvalidParameterError(name, f"must be in {left}{lo}, {hi}], got {value}")


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's continuation.

    temperature 0 means greedy. `seed` makes sampling reproducible whatever else
    shares the batch. Penalties follow the OpenAI (presence/frequency, over output
    tokens) and CTRL (repetition, over prompt + output tokens) definitions.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N logprobs per sampled position (0: only the sampled token)
    prompt_logprobs: None = None  # not supported yet; present so callers get a clear error
    skip_special_tokens: bool = True
    # A resumed stream (set by the gateway, never by users): the last `resume_tokens`
    # prompt tokens are this request's own earlier output, of which the client already
    # has the first `resume_chars` characters. Sampling continues exactly (seeded draws
    # skipped, penalties count them as output); text resumes at that character.
    resume_tokens: int = 0
    resume_chars: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    # NOTE: validation raises typed errors, never asserts: these values come from users.
    def validate(self) -> None:
        if not isinstance(self.n, int) or self.n < 1 or self.n > 128:
            raise InvalidParameterError("n", f"must be an integer in [1, 128], got {self.n!r}")
        _check_range("temperature", float(self.temperature), 0.0, 100.0)
        _check_range("top_p", float(self.top_p), 0.0, 1.0, lo_open=True)
        if not isinstance(self.top_k, int) or (self.top_k < -1):
            raise InvalidParameterError("top_k", f"must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        _check_range("min_p", float(self.min_p), 0.0, 1.0)
        _check_range("presence_penalty", float(self.presence_penalty), -2.0, 2.0)
        _check_range("frequency_penalty", float(self.frequency_penalty), -2.0, 2.0)
        _check_range("repetition_penalty", float(self.repetition_penalty), 0.0, 2.0 ** 31, lo_open=True)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InvalidParameterError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise InvalidParameterError("min_tokens", f"must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError(
                "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InvalidParameterError("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidParameterError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None:
            raise InvalidParameterError("prompt_logprobs", "is not supported yet")
        if not isinstance(self.resume_tokens, int) or not isinstance(self.resume_chars, int) \
                or self.resume_tokens < 0 or self.resume_chars < 0:
            raise InvalidParameterError("resume_tokens", "resume_tokens and resume_chars must be >= 0")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError("stop", f"each stop string must be a non-empty string, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                raise InvalidParameterError("stop_token_ids", f"must be non-negative integers, got {t!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0
