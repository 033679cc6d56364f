"""The gateway's Backend for the shared OpenAI HTTP layer: routes each call to a
replica over gRPC, retries calls that fail before their first token on another
replica (bounded, with backoff), and maps replica errors to the HTTP layer's
(scalellm.gateway.errors).

The first chunk is awaited before `generate` returns, so validation errors from
the replica become a proper HTTP status instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from scalellm.api.tracing import current_span
from scalellm.gateway.errors import from_grpc, no_replica
from scalellm.gateway.replica_client import ReplicaClient
from scalellm.gateway.routing import Policy, outstanding
from scalellm.protocol.generation import GenerateCall, GenerateChunk

logger = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.INTERNAL}
# NOTE: RESOURCE_EXHAUSTED is the replica's queue being full: retried elsewhere, but it
# is backpressure, not a fault, so it does not count against the replica's breaker.
_REPLICA_FAULTS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def _to_error(e: grpc.aio.AioRpcError) -> Exception:
    return from_grpc(e.code(), e.details() or "")


# Tracing on (the call carries a traceparent): the request's span names the replica
# that serves it and records retries and resumes as events.
def _note_replica(address: str, attempt: int) -> None:
    span = current_span()
    if span is not None:
        span.set("scalellm.replica", address)
        if attempt:
            span.event("retry", replica=address, attempt=attempt)


def _note_resume(lost: str, num_tokens: int) -> None:
    span = current_span()
    if span is not None:
        span.event("resume", lost_replica=lost, num_tokens=num_tokens)


class GatewayBackend:
    def __init__(self, replicas: list[ReplicaClient], policy: Policy, max_retries: int = 2,
                 retry_backoff: float = 0.05, mux: bool = True) -> None:
        self.replicas = replicas
        self.mux = mux  # replicas added later use GenerateMux too
        self.policy = policy
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.num_retries = 0
        self.num_resumed = 0
        self._closing: set[asyncio.Task] = set()

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
            **{f'gateway_replica_in_flight{{replica="{r.address}"}}': r.in_flight for r in self.replicas},
            **{f'gateway_replica_breaker_state{{replica="{r.address}"}}': int(r.breaker.state) for r in self.replicas},
            **{f'gateway_replica_requests_total{{replica="{r.address}"}}': r.num_requests for r in self.replicas},
            **{f'gateway_replica_failures_total{{replica="{r.address}"}}': r.num_failures for r in self.replicas},
            "gateway_replicas_healthy": len(healthy),
            "gateway_replicas_total": len(self.replicas),
            "gateway_requests_in_flight": sum(r.in_flight for r in self.replicas),
            "gateway_retries_total": self.num_retries,
            "gateway_resumed_streams_total": self.num_resumed,
            "num_requests_running": sum(r.load.num_running for r in healthy),
            "num_requests_waiting": sum(r.load.num_waiting for r in healthy),
            "kv_cache_blocks_used": sum(r.load.kv_blocks_used for r in healthy),
            "kv_cache_blocks_total": sum(r.load.kv_blocks_total for r in healthy),
        }

    async def add_replica(self, address: str, pool: str = "default") -> ReplicaClient:
        client = ReplicaClient(address, pool, mux=self.mux)
        await client.start()
        self.replicas = [*self.replicas, client]  # NOTE: a new list: iterations in flight keep theirs
        return client

    async def remove_replica(self, address: str, drain_timeout: float) -> bool:
        """Take no new requests, let in-flight ones finish (up to the timeout), drop it.
        Returns whether it drained fully (streams still running then are resumed elsewhere)."""
        client = next(r for r in self.replicas if r.address == address)
        client.removing = True
        loop = asyncio.get_running_loop()
        end = loop.time() + drain_timeout
        while client.in_flight and loop.time() < end:
            await asyncio.sleep(0.05)
        drained = client.in_flight == 0
        self.replicas = [r for r in self.replicas if r is not client]
        await client.close()
        return drained

    def _candidates(self, call: GenerateCall, tried: set[str]) -> list[ReplicaClient]:
        return [r for r in self.replicas if r.healthy and r.address not in tried and call.model in r.models]

    async def _open(self, call: GenerateCall, tried: set[str]
                    ) -> tuple[GenerateChunk, AsyncIterator[GenerateChunk], ReplicaClient, float]:
        """Start the call on a replica, retrying on others until one yields its first chunk.
        Returns (first chunk, the rest of the stream, the replica, when it was routed)."""
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            candidates = self._candidates(call, tried)
            if not candidates:
                break
            replica = self.policy.choose(candidates, call)
            tried.add(replica.address)
            if call.traceparent:  # tracing is on: name the replica on the request's span
                _note_replica(replica.address, attempt)
            routed = time.time()
            stream = replica.generate(call)
            try:
                first = await stream.__anext__()
            except grpc.aio.AioRpcError as e:
                await stream.aclose()
                err = _to_error(e)
                if e.code() not in _RETRYABLE:
                    raise err from None
                if e.code() in _REPLICA_FAULTS:
                    replica.record_failure(gone=e.code() == grpc.StatusCode.UNAVAILABLE)
                last_error = err
                self.num_retries += 1
                logger.warning("replica %s failed before the first token (%s); retrying", replica.address, e.code())
                await asyncio.sleep(self.retry_backoff * (2**attempt))
            else:
                replica.record_success()
                if first.finished:
                    first.timings["routed_unix"] = routed
                return first, stream, replica, routed
        raise no_replica(f"no replica could take the request ({last_error or 'none healthy'})")

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]:
        tried: set[str] = set()
        first, stream, replica, routed = await self._open(call, tried)
        return self._rest(call, first, stream, replica, tried, routed)

    async def _rest(self, call: GenerateCall, first: GenerateChunk, stream: AsyncIterator[GenerateChunk],
                    replica: ReplicaClient, tried: set[str], routed: float) -> AsyncIterator[GenerateChunk]:
        """Relay chunks, adding the gateway's routing time to the last one; if the replica is
        lost mid-stream (n == 1), resume on another replica from prompt + tokens produced so
        far, so the client sees one uninterrupted stream."""
        prompt_ids = first.prompt_token_ids
        num_prompt = first.num_prompt_tokens
        produced: list[int] = []
        produced_chars = 0
        resumed = False
        chunk: GenerateChunk | None = first
        try:
            while True:
                try:
                    if chunk is None:
                        chunk = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except grpc.aio.AioRpcError as e:
                    resumable = (e.code() in _RETRYABLE or e.code() == grpc.StatusCode.CANCELLED) and \
                        call.params.n == 1 and prompt_ids is not None
                    if not resumable:
                        raise _to_error(e) from None
                    if e.code() != grpc.StatusCode.CANCELLED:
                        replica.record_failure(gone=e.code() == grpc.StatusCode.UNAVAILABLE)
                    await stream.aclose()
                    cont = self._continuation(call, prompt_ids, produced, produced_chars)
                    if cont is None:
                        return
                    self.num_resumed += 1
                    if call.traceparent:
                        _note_resume(replica.address, len(produced))
                    logger.warning("replica %s lost mid-stream after %d tokens (%s); resuming",
                                   replica.address, len(produced), e.code())
                    chunk, stream, replica, routed = await self._open(cont, tried)
                    resumed = True
                    continue
                for c in chunk.choices:
                    produced.extend(c.token_ids)
                    produced_chars += len(c.text)
                if resumed:  # report the continuation as the same request
                    chunk.num_completion_tokens = len(produced)
                    chunk.num_prompt_tokens = num_prompt
                    chunk.prompt_text = None
                if chunk.finished:
                    chunk.timings["routed_unix"] = routed
                    yield chunk
                    return
                yield chunk
                chunk = None
        finally:
            await stream.aclose()

    def _continuation(self, call: GenerateCall, prompt_ids: list[int], produced: list[int],
                      produced_chars: int) -> GenerateCall | None:
        """The rest of a stream as a new call: prompt + produced tokens, marked as a resume
        so the replica continues exactly (seeded draws skipped, penalties and stop strings
        see the earlier output, text picks up at the character the client has)."""
        p = call.params
        if p.max_tokens is not None and len(produced) >= p.max_tokens:
            return None
        params = replace(p, max_tokens=None if p.max_tokens is None else p.max_tokens - len(produced),
                         min_tokens=max(p.min_tokens - len(produced), 0),
                         resume_tokens=len(produced), resume_chars=produced_chars)
        return GenerateCall(f"{call.request_id}-resume{self.num_resumed}", call.model, params,
                            prompt=list(prompt_ids) + produced, priority=call.priority,
                            deadline_unix=call.deadline_unix, trace_id=call.trace_id,
                            arrival_unix=call.arrival_unix, traceparent=call.traceparent)

    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool) -> list[int]:
        healthy = [r for r in self.replicas if r.healthy]
        if not healthy:
            raise no_replica("no healthy replica")
        try:
            return await min(healthy, key=outstanding).tokenize(prompt, messages, add_special_tokens)
        except grpc.aio.AioRpcError as e:
            raise _to_error(e) from None

    async def detokenize(self, tokens: list[int]) -> str:
        healthy = [r for r in self.replicas if r.healthy]
        if not healthy:
            raise no_replica("no healthy replica")
        try:
            return await min(healthy, key=outstanding).detokenize(tokens)
        except grpc.aio.AioRpcError as e:
            raise _to_error(e) from None

