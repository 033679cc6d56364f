"""The Guard: every policy check between an HTTP request and the backend, in order:

    authenticate (401) → rate limits (429) → request limits + input filters (400)
    → per-key concurrency (429) → global admission queue (503) → [backend]
    → output filters → charge tokens

Every refusal is an APIError in OpenAI format with Retry-After where waiting helps,
and is logged with the request id and key id (never the key). Knows nothing of
backends or engines.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from scalellm.api.admission import Admission, AdmissionConfig, Overloaded
from scalellm.api.errors import APIError
from scalellm.api.safety import (
    ApiKey,
    ContentFilter,
    FilterHit,
    KeyLimits,
    KeyState,
    KeyStore,
    SafetyConfig,
    TokenBucket,
    anonymous,
)

logger = logging.getLogger("scalellm.guard")


def _too_many(message: str, retry_after: float, code: str) -> APIError:
    return APIError(429, message, "rate_limit_error", None, code, {"retry-after": str(max(1, math.ceil(retry_after)))})


def content_filter_error(param: str) -> APIError:
    return APIError(400, "the request was rejected by the content filter", "invalid_request_error", param,
                    "content_filter")


@dataclass(slots=True)
class Ticket:
    key: ApiKey
    request_id: str


class Guard:
    def __init__(self, safety: SafetyConfig = SafetyConfig(), admission: AdmissionConfig = AdmissionConfig(),
                 clock: Callable[[], float] | None = None) -> None:
        self.safety = safety
        self.keys = KeyStore(safety.keys)
        self.admission = Admission(admission)
        self.input_filter = ContentFilter(safety.input_filters)
        self.output_filter = ContentFilter(safety.output_filters)
        self._clock = clock
        self._state: dict[str, KeyState] = {}

    @classmethod
    def with_key(cls, api_key: str | None) -> Guard:
        return cls(SafetyConfig(keys=(ApiKey.from_secret(api_key, "default"),) if api_key else ()))

    @property
    def open(self) -> bool:
        return len(self.keys) == 0

    # -- identity ----------------------------------------------------------------------
    def authenticate(self, authorization: str | None, request_id: str) -> ApiKey:
        if self.open:
            return anonymous()
        key = None
        if authorization is not None and authorization[:7].lower() == "bearer ":
            key = self.keys.lookup(authorization[7:].strip())
        if key is None:
            logger.warning("rejected request_id=%s reason=invalid_api_key", request_id,
                           extra={"request_id": request_id, "reason": "invalid_api_key"})
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", "invalid_request_error",
                           None, "invalid_api_key")
        return key

    def _key_state(self, key: ApiKey) -> KeyState:
        st = self._state.get(key.key_id)
        if st is None:
            lim = key.limits if key.limits != KeyLimits() else self.safety.default_key_limits
            kw = {} if self._clock is None else {"clock": self._clock}
            st = KeyState(TokenBucket(lim.requests_per_min, **kw) if lim.requests_per_min else None,
                          TokenBucket(lim.tokens_per_min, **kw) if lim.tokens_per_min else None, 0, lim)
            self._state[key.key_id] = st
        return st

    def _reject(self, request_id: str, key: ApiKey, reason: str) -> None:
        logger.warning("rejected request_id=%s key_id=%s reason=%s", request_id, key.key_id, reason,
                       extra={"request_id": request_id, "key_id": key.key_id, "reason": reason})

    # -- before the backend ------------------------------------------------------------
    def check_request(self, key: ApiKey, request_id: str, prompts: list[Any] | None,
                      messages: list[dict[str, str]] | None, max_tokens: int | None, n: int,
                      logprobs: bool) -> tuple[list[Any] | None, list[dict[str, str]] | None]:
        """Limits and input filters. Returns (prompts, messages), redacted where a rule says so."""
        st = self._key_state(key)
        if st.requests is not None:
            wait = st.requests.try_take(1)
            if wait:
                self._reject(request_id, key, "requests_per_min")
                raise _too_many(f"rate limit: {st.limits.requests_per_min:g} requests/min for this key", wait,
                                "rate_limit_exceeded")
        if st.tokens is not None:
            wait = st.tokens.wait_until_positive()
            if wait:
                self._reject(request_id, key, "tokens_per_min")
                raise _too_many(f"rate limit: {st.limits.tokens_per_min:g} tokens/min for this key", wait,
                                "rate_limit_exceeded")
        lim = self.safety.limits
        if lim.max_n and n > lim.max_n:
            self._reject(request_id, key, "n")
            raise APIError(400, f"n must be <= {lim.max_n} on this server, got {n}", "invalid_request_error", "n")
        if lim.max_tokens and (max_tokens is None or max_tokens > lim.max_tokens):
            self._reject(request_id, key, "max_tokens")
            raise APIError(400, f"max_tokens must be set and <= {lim.max_tokens} on this server, got {max_tokens}",
                           "invalid_request_error", "max_tokens")
        texts = [p for p in (prompts or []) if isinstance(p, str)] + [m["content"] for m in (messages or [])]
        if lim.max_prompt_chars and sum(map(len, texts)) > lim.max_prompt_chars:
            self._reject(request_id, key, "prompt_length")
            raise APIError(400, f"the prompt is longer than this server's limit of {lim.max_prompt_chars} characters",
                           "invalid_request_error", "messages" if messages is not None else "prompt",
                           "prompt_too_long")
        if self.output_filter and logprobs:
            raise APIError(400, "logprobs are not available on this server (output filters are configured)",
                           "invalid_request_error", "logprobs")
        if not self.input_filter:
            return prompts, messages
        param = "messages" if messages is not None else "prompt"
        try:
            if prompts is not None:
                if any(not isinstance(p, str) for p in prompts):
                    self._reject(request_id, key, "token_prompt_with_filters")
                    raise APIError(400, "token-id prompts are not accepted on this server (input filters are "
                                        "configured); send text", "invalid_request_error", "prompt")
                prompts = [self.input_filter.apply(p) for p in prompts]
            if messages is not None:
                messages = [{**m, "content": self.input_filter.apply(m["content"])} for m in messages]
        except FilterHit:
            self._reject(request_id, key, "content_filter")
            raise content_filter_error(param) from None
        return prompts, messages

    @contextlib.asynccontextmanager
    async def admit(self, key: ApiKey, request_id: str, priority: int) -> AsyncIterator[Ticket]:
        """Hold a per-key and a global slot for the request's whole life."""
        st = self._key_state(key)
        if st.limits.max_concurrency and st.in_flight >= st.limits.max_concurrency:
            self._reject(request_id, key, "key_concurrency")
            raise _too_many(f"too many concurrent requests for this key (limit {st.limits.max_concurrency})", 1,
                            "concurrency_limit_exceeded")
        st.in_flight += 1
        try:
            try:
                await self.admission.acquire(priority)
            except Overloaded as e:
                self._reject(request_id, key, "overloaded")
                raise APIError(503, str(e), "service_unavailable", None, "server_overloaded",
                               {"retry-after": str(math.ceil(e.retry_after))}) from None
            try:
                yield Ticket(key, request_id)
            finally:
                self.admission.release()
        finally:
            st.in_flight -= 1

    def charge(self, key: ApiKey, tokens: int) -> None:
        st = self._state.get(key.key_id)
        if st is not None and st.tokens is not None and tokens:
            st.tokens.charge(tokens)

    def gauges(self) -> dict[str, float]:
        return {"admission_in_flight": self.admission.in_flight, "admission_waiting": self.admission.waiting,
                "admission_rejected_total": self.admission.num_rejected}
