"""`scalellm serve`: one replica (engine-core process + asyncio frontend) behind the
OpenAI HTTP API on uvicorn. SIGTERM drains: stop accepting, finish in-flight requests
up to a timeout, stop the core, exit 0. If the engine core dies, the server reports
not-ready, fails in-flight requests and exits non-zero."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import uvicorn

from scalellm.api.app import OpenAIApp
from scalellm.api.tracing import Tracing
from scalellm.api.uvicorn_server import DrainingServer
from scalellm.engine.builder import resolve_model_info
from scalellm.engine.config import EngineConfig
from scalellm.memory import trim_heap
from scalellm.server.async_engine import AsyncEngine
from scalellm.server.backend import EngineBackend
from scalellm.server.core_client import CoreClient
from scalellm.server.expert_metrics import ExpertLoadCollector
from scalellm.server.phase_metrics import PhaseCollector

logger = logging.getLogger("scalellm.serve")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int | None = 8000  # None: no HTTP (a gRPC-only replica)
    grpc_port: int | None = None  # None: no gRPC
    served_model_name: str | None = None
    api_key: str | None = None
    drain_timeout: float = 30.0
    max_pending: int = 4096
    log_level: str = "WARNING"
    otlp_endpoint: str | None = None  # OpenTelemetry traces (OTLP/gRPC); None: off


def run_server(engine_config: EngineConfig, serve: ServeConfig, client: CoreClient | None = None) -> int:
    """Run one replica until SIGTERM/SIGINT (drain) or engine death (exit 1). `client`: an
    engine core already spawned (CoreClient.spawn) for this config."""
    if serve.port is None and serve.grpc_port is None:
        raise ValueError("a replica needs an HTTP port, a gRPC port, or both")
    t0 = time.monotonic()
    info = resolve_model_info(engine_config)
    engine = AsyncEngine(engine_config, info, serve.max_pending, serve.log_level, client)
    backend = EngineBackend(engine, serve.served_model_name or info.model_name)
    tracing = Tracing("scalellm-replica", serve.otlp_endpoint) if serve.otlp_endpoint else None
    app = OpenAIApp(backend, api_key=serve.api_key, tracing=tracing)
    app.metrics.registry.register(ExpertLoadCollector(lambda: engine.client.expert_tokens))
    app.metrics.registry.register(PhaseCollector(lambda: engine.client.load))
    state: dict = {"exit_code": 0, "grpc": None, "stop": None}

    async def start() -> None:
        await engine.start()
        if serve.grpc_port is not None:
            from scalellm.server.grpc_service import ReplicaService, start_grpc_server

            state["grpc"] = await start_grpc_server(ReplicaService(backend, info.max_model_len, tracing),
                                                    serve.host, serve.grpc_port)
        asyncio.get_running_loop().create_task(watch_engine())
        where = [f"http://{serve.host}:{serve.port}"] if serve.port is not None else []
        where += [f"grpc://{serve.host}:{serve.grpc_port}"] if serve.grpc_port is not None else []
        logger.warning("ready: serving %s on %s in %.1fs", backend.model_names[0], ", ".join(where),
                       time.monotonic() - t0)
        trim_heap()  # building the tokenizer (GGUF vocabulary parse) left freed pages in the heap

    async def watch_engine() -> None:
        while engine.is_ready:
            await asyncio.sleep(0.1)
        if not app.draining:
            logger.error("engine core died (%s); shutting down", engine.client.dead_reason)
            state["exit_code"] = 1
            state["stop"]()

    async def stop() -> None:
        app.draining = True
        if state["grpc"] is not None:
            await state["grpc"].stop(serve.drain_timeout)
        await engine.shutdown()
        if tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)  # export what is left

    if serve.port is None:
        return _run_grpc_only(start, stop, state)
    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    config = uvicorn.Config(app, host=serve.host, port=serve.port, loop="uvloop", http="httptools", lifespan="on",
                            log_level=serve.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=int(serve.drain_timeout))
    server = DrainingServer(config)

    def request_stop() -> None:
        server.should_exit = True

    state["stop"] = request_stop
    server.run()
    if not server.started:
        return 1
    return state["exit_code"]


def _run_grpc_only(start, stop, state: dict) -> int:  # type: ignore[no-untyped-def]
    import uvloop

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        state["stop"] = done.set
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        await start()
        await done.wait()
        await stop()

    uvloop.run(main())
    return state["exit_code"]
