"""One replica as the gateway sees it: a persistent HTTP/2 channel, its latest Load
report (streamed), the gateway's own count of requests in flight, and health."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from scalellm.gateway.convert import call_to_proto, chunk_from_proto
from scalellm.protocol.generation import GenerateCall, GenerateChunk
from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class ReplicaClient:
    def __init__(self, address: str, load_interval_ms: int = 100) -> None:
        self.address = address
        self.load_interval_ms = load_interval_ms
        # NOTE: grpc.aio channels bind to the running event loop: made in start(), not here.
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.ReplicaStub | None = None
        self.load = pb.LoadResponse()
        self.in_flight = 0  # requests this gateway has open on the replica
        self.healthy = False
        self.models: list[str] = []
        self.max_model_len = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address,
                                                 options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.ReplicaStub(self.channel)
        self._task = asyncio.create_task(self._watch_load())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.channel is not None:
            await self.channel.close()

    async def _watch_load(self) -> None:
        """Stream Load reports; on failure mark unhealthy and retry with backoff."""
        backoff = 0.1
        while True:
            try:
                models = await self.stub.Models(pb.ModelsRequest(), timeout=5)
                self.models, self.max_model_len = list(models.models), models.max_model_len
                async for load in self.stub.StreamLoad(pb.LoadRequest(interval_ms=self.load_interval_ms)):
                    self.load = load
                    self.healthy = True
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if self.healthy:
                    logger.warning("replica %s unreachable: %s", self.address, e.code())
                self.healthy = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]:
        self.in_flight += 1
        stream = self.stub.Generate(call_to_proto(call, call.deadline_unix))
        try:
            async for resp in stream:
                yield chunk_from_proto(resp)
        finally:
            self.in_flight -= 1
            stream.cancel()  # no-op when finished; aborts on the replica otherwise

    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool) -> list[int]:
        req = pb.TokenizeRequest(add_special_tokens=add_special_tokens)
        if messages is not None:
            req.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                                            for m in messages]))
        else:
            req.prompt = prompt or ""
        return list((await self.stub.Tokenize(req, timeout=10)).tokens)
