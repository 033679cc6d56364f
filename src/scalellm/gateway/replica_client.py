"""One replica as the gateway sees it: a persistent HTTP/2 channel, its latest Load
report (streamed), the gateway's own count of requests in flight, a circuit breaker
fed by passive errors and active health probes, and its pool.

`healthy` (may take new requests) = the Load stream is up, a Health probe has said
ready once (not starting), the breaker is closed and the replica is not being removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from scalellm.gateway.convert import call_to_proto, chunk_from_proto
from scalellm.gateway.health import BreakerState, CircuitBreaker
from scalellm.protocol.generation import GenerateCall, GenerateChunk
from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc
from scalellm.protocol.grpc.mux import MuxClient, MuxUnsupported

logger = logging.getLogger(__name__)


STARTING_POLL = 0.05  # seconds between probes of a replica that has not been ready yet


class ReplicaClient:
    def __init__(self, address: str, pool: str = "default", load_interval_ms: int = 100,
                 probe_interval: float = 1.0, probe_timeout: float = 5.0,
                 breaker: CircuitBreaker | None = None, mux: bool = True) -> None:
        self.address = address
        self.use_mux = mux  # calls over one GenerateMux stream (when the replica has it)
        self.pool = pool
        self.load_interval_ms = load_interval_ms
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.breaker = breaker or CircuitBreaker()
        # NOTE: grpc.aio channels bind to the running event loop: made in start(), not here.
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.ReplicaStub | None = None
        self.mux: MuxClient | None = None
        self.load = pb.LoadResponse()
        self.in_flight = 0  # requests this gateway has open on the replica
        self.connected = False  # the Load stream is up
        self.removing = False  # being removed: finish what runs, take nothing new
        self.models: list[str] = []
        self.max_model_len = 0
        self.num_requests = 0
        self.num_failures = 0
        # NOTE: until its first good probe a replica is starting, not failing: it is polled
        # every STARTING_POLL s and refusals do not count against its breaker. (Counting them
        # opened the breaker while the replica loaded, and `scalellm serve` then waited out a
        # cooldown: 2.7 s of a 7 s start-up.)
        self.starting = True
        self._tasks: list[asyncio.Task] = []

    @property
    def healthy(self) -> bool:
        # NOTE: not while starting: the Load stream may be up before the replica's Health says
        # ready (CI once saw /ready answer 200 while the replica still counted as starting)
        return self.connected and not self.starting and not self.removing and self.breaker.allows_requests()

    async def start(self) -> None:
        # NOTE: gRPC's default reconnect backoff (1 s, x1.6, up to 120 s) left a channel that
        # was refused while its replica loaded waiting seconds after the replica was up;
        # a refused local connect costs microseconds, so retry at most every 250 ms.
        self.channel = grpc.aio.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 250)])
        self.stub = pb_grpc.ReplicaStub(self.channel)
        self.mux = MuxClient(self.stub) if self.use_mux else None
        self._tasks = [asyncio.create_task(self._watch_load()), asyncio.create_task(self._probe())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.mux is not None:
            self.mux.close()
        if self.channel is not None:
            await self.channel.close()

    def record_success(self) -> None:
        self.breaker.success()

    def record_failure(self, gone: bool = False) -> None:
        """A failure on the replica's side; `gone`: it is unreachable (open the breaker now)."""
        self.num_failures += 1
        before = self.breaker.state
        self.breaker.trip() if gone else self.breaker.failure()
        if before != BreakerState.OPEN and self.breaker.state == BreakerState.OPEN:
            logger.warning("replica %s: circuit breaker open", self.address)

    async def _watch_load(self) -> None:
        """Stream Load reports; on failure mark disconnected and retry with backoff."""
        backoff = 0.1
        while True:
            try:
                models = await self.stub.Models(pb.ModelsRequest(), timeout=5)
                self.models, self.max_model_len = list(models.models), models.max_model_len
                async for load in self.stub.StreamLoad(pb.LoadRequest(interval_ms=self.load_interval_ms)):
                    self.load = load
                    self.connected = True
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if self.connected:
                    logger.warning("replica %s unreachable: %s", self.address, e.code())
                self.connected = False
            await asyncio.sleep(STARTING_POLL if self.starting else backoff)
            backoff = min(backoff * 2, 2.0)

    async def _probe(self) -> None:
        """Active health probes: a failed or not-ready probe counts as a failure; a good one
        closes a half-open breaker. Probes faster while the breaker is not closed."""
        while True:
            state = self.breaker.state
            if not self.starting:
                await asyncio.sleep(self.probe_interval if state == BreakerState.CLOSED else self.probe_interval / 4)
            try:
                ok = (await self.stub.Health(pb.HealthRequest(), timeout=self.probe_timeout)).ready
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError:
                ok = False
            if self.starting:
                if not ok:
                    await asyncio.sleep(STARTING_POLL)
                    continue
                self.starting = False
            before = self.breaker.state
            if ok:
                self.breaker.success()
                if before == BreakerState.HALF_OPEN:
                    logger.warning("replica %s: probe succeeded, circuit breaker closed", self.address)
            else:
                self.record_failure()

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]:
        """The call's chunks from this replica; raises grpc.aio.AioRpcError as Generate does.
        Over the replica's GenerateMux stream where it has one (one HTTP/2 message per engine
        step for all calls, not one per call and token), else one Generate call."""
        self.in_flight += 1
        self.num_requests += 1
        request = call_to_proto(call, call.deadline_unix)
        try:
            if self.mux is not None and self.mux.supported is not False:
                try:
                    # NOTE: closed explicitly: an early exit here must cancel the call on the
                    # replica now, not when the abandoned generator is garbage-collected
                    async with contextlib.aclosing(self.mux.generate(request, call.traceparent or "")) as responses:
                        async for resp in responses:
                            yield chunk_from_proto(resp)
                    return
                except MuxUnsupported:
                    logger.info("replica %s has no GenerateMux: one Generate call per request", self.address)
            # the trace context travels as gRPC metadata (W3C `traceparent`), only when tracing is on
            metadata = (("traceparent", call.traceparent),) if call.traceparent else None
            stream = self.stub.Generate(request, metadata=metadata)
            try:
                async for resp in stream:
                    yield chunk_from_proto(resp)
            finally:
                if not stream.done():
                    stream.cancel()  # aborts on the replica
        finally:
            self.in_flight -= 1

    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool) -> list[int]:
        req = pb.TokenizeRequest(add_special_tokens=add_special_tokens)
        if messages is not None:
            req.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                                            for m in messages]))
        else:
            req.prompt = prompt or ""
        return list((await self.stub.Tokenize(req, timeout=10)).tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self.stub.Detokenize(pb.DetokenizeRequest(tokens=tokens), timeout=10)).text

    def describe(self) -> dict:
        return {"address": self.address, "pool": self.pool, "healthy": self.healthy, "connected": self.connected,
                "breaker": self.breaker.state.name.lower(), "starting": self.starting, "removing": self.removing,
                "in_flight": self.in_flight,
                "models": self.models, "num_requests": self.num_requests, "num_failures": self.num_failures,
                "load": {"running": self.load.num_running, "waiting": self.load.num_waiting,
                         "kv_blocks_used": self.load.kv_blocks_used, "kv_blocks_total": self.load.kv_blocks_total}}
