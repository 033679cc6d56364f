"""The gateway's Backend for the shared OpenAI HTTP layer: routes each call to a
replica over gRPC, retries calls that fail before their first token on another
replica (bounded, with backoff), and maps replica errors to the HTTP layer's.

The first chunk is awaited before `generate` returns, so validation errors from
the replica become a proper HTTP status instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from scalellm.gateway.replica_client import ReplicaClient
from scalellm.gateway.routing import Policy, outstanding
from scalellm.protocol.errors import ContextLengthError, InvalidParameterError, ScaleLLMError
from scalellm.protocol.generation import GenerateCall, GenerateChunk

logger = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.INTERNAL}


class NoReplicaError(ScaleLLMError):
    """No healthy replica can take the call (maps to 503 + Retry-After)."""


def _to_error(e: grpc.aio.AioRpcError) -> Exception:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param, _, message = details.partition(": ")
        cls = ContextLengthError if "context length" in details else InvalidParameterError
        return cls(param or "body", message or details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(details)
    return NoReplicaError(f"replica error {code.name}: {details}")


class GatewayBackend:
    def __init__(self, replicas: list[ReplicaClient], policy: Policy, max_retries: int = 2,
                 retry_backoff: float = 0.05) -> None:
        self.replicas = replicas
        self.policy = policy
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.num_retries = 0

    @property
    def model_names(self) -> list[str]:
        names: list[str] = []
        for r in self.replicas:
            names += [m for m in r.models if m not in names]
        return names

    def is_ready(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def engine_gauges(self) -> dict[str, float]:
        healthy = [r for r in self.replicas if r.healthy]
        return {
            "gateway_replicas_healthy": len(healthy),
            "gateway_replicas_total": len(self.replicas),
            "gateway_requests_in_flight": sum(r.in_flight for r in self.replicas),
            "gateway_retries_total": self.num_retries,
            "num_requests_running": sum(r.load.num_running for r in healthy),
            "num_requests_waiting": sum(r.load.num_waiting for r in healthy),
            "kv_cache_blocks_used": sum(r.load.kv_blocks_used for r in healthy),
            "kv_cache_blocks_total": sum(r.load.kv_blocks_total for r in healthy),
        }

    def _candidates(self, call: GenerateCall, tried: set[str]) -> list[ReplicaClient]:
        return [r for r in self.replicas if r.healthy and r.address not in tried and call.model in r.models]

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]:
        tried: set[str] = set()
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            candidates = self._candidates(call, tried)
            if not candidates:
                break
            replica = self.policy.choose(candidates, call)
            tried.add(replica.address)
            stream = replica.generate(call)
            try:
                first = await stream.__anext__()
            except grpc.aio.AioRpcError as e:
                await stream.aclose()
                err = _to_error(e)
                if e.code() not in _RETRYABLE:
                    raise err from None
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    replica.healthy = False
                last_error = err
                self.num_retries += 1
                logger.warning("replica %s failed before the first token (%s); retrying", replica.address, e.code())
                await asyncio.sleep(self.retry_backoff * (2**attempt))
                continue
            return self._rest(first, stream)
        raise NoReplicaError(f"no replica could take the request ({last_error or 'none healthy'})")

    async def _rest(self, first: GenerateChunk, stream: AsyncIterator[GenerateChunk]) -> AsyncIterator[GenerateChunk]:
        try:
            yield first
            async for chunk in stream:
                yield chunk
        except grpc.aio.AioRpcError as e:
            raise _to_error(e) from None
        finally:
            await stream.aclose()

    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool) -> list[int]:
        healthy = [r for r in self.replicas if r.healthy]
        if not healthy:
            raise NoReplicaError("no healthy replica")
        return await min(healthy, key=outstanding).tokenize(prompt, messages, add_special_tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        raise InvalidParameterError("tokens", "detokenize is served by replicas, not the gateway")
