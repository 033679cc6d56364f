"""A replica stand-in for gateway tests: the real gRPC Replica service with scripted
behaviour (no model), served from a background thread of the test process.

Each Generate yields `max_tokens` chunks of TOKEN_TEXT after `token_delay` seconds each
(or fails with `fail` before the first token); `ready` drives Health.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from scalellm.protocol.grpc import replica_pb2 as pb
from scalellm.protocol.grpc import replica_pb2_grpc as pb_grpc

TOKEN_TEXT = " tok"


class StandIn(pb_grpc.ReplicaServicer):
    def __init__(self, model: str = "fake") -> None:
        self.model = model
        self.fail: grpc.StatusCode | None = None
        self.ready = True
        self.token_delay = 0.0
        self.texts: list[str] | None = None  # per-chunk texts (default: TOKEN_TEXT each)
        self.calls: list[pb.GenerateRequest] = []
        self.active = 0
        self.cancelled = 0

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append(request)
        if self.fail is not None:
            await context.abort(self.fail, "scripted failure")
        texts = self.texts
        n = len(texts) if texts else (request.params.max_tokens or 16)
        received = time.time()
        self.active += 1
        finished = False
        try:
            for i in range(n):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                last = i == n - 1
                resp = pb.GenerateResponse(
                    choices=[pb.Choice(index=0, text=texts[i] if texts else TOKEN_TEXT, token_ids=[7], finish_reason="length" if last else "")],
                    prompt_tokens=3, completion_tokens=i + 1, finished=last)
                if i == 0:
                    resp.prompt_text = "fake prompt"
                    resp.prompt_token_ids.extend([1, 2, 3])
                if last:
                    now = time.time()
                    resp.timestamps.CopyFrom(pb.Timestamps(received=received, queued=received + 1e-4,
                                                           first_scheduled=received + 2e-4,
                                                           first_token=received + 3e-4, finished=now))
                    resp.timings.CopyFrom(pb.Timings(queue=1e-4, ttft=3e-4, e2e=now - received))
                yield resp
            finished = True
        finally:
            self.active -= 1
            if not finished:
                self.cancelled += 1

    async def Health(self, request, context):  # type: ignore[no-untyped-def]
        return pb.HealthResponse(live=True, ready=self.ready)

    async def Load(self, request, context):  # type: ignore[no-untyped-def]
        return pb.LoadResponse(kv_blocks_total=100, num_running=self.active)

    async def StreamLoad(self, request, context):  # type: ignore[no-untyped-def]
        while True:
            yield pb.LoadResponse(kv_blocks_total=100, num_running=self.active)
            await asyncio.sleep(max(request.interval_ms, 10) / 1000)

    async def Models(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ModelsResponse(models=[self.model], max_model_len=4096)

    async def Tokenize(self, request, context):  # type: ignore[no-untyped-def]
        return pb.TokenizeResponse(tokens=[1, 2, 3])


class StandInServer:
    """Serve a StandIn (or the given servicer) on 127.0.0.1:`port` until stop()."""

    def __init__(self, port: int, model: str = "fake", servicer: pb_grpc.ReplicaServicer | None = None) -> None:
        self.port = port
        self.servicer = servicer if servicer is not None else StandIn(model)
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("stand-in did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = grpc.aio.server()
            pb_grpc.add_ReplicaServicer_to_server(self.servicer, self._server)
            self._server.add_insecure_port(self.address)
            await self._server.start()

        self._loop.run_until_complete(start())
        started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        """Stop serving (at once: open calls break) and the thread; a second call does nothing."""
        if not self._thread.is_alive():
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
