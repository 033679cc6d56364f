"""`scalellm serve`: one replica (engine-core process + asyncio frontend) behind the
OpenAI HTTP API on uvicorn. SIGTERM drains: stop accepting, finish in-flight requests
up to a timeout, stop the core, exit 0. If the engine core dies, the server reports
not-ready, fails in-flight requests and exits non-zero."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from scalellm.api.app import OpenAIApp
from scalellm.engine.builder import resolve_model_info
from scalellm.engine.config import EngineConfig
from scalellm.server.async_engine import AsyncEngine
from scalellm.server.backend import EngineBackend

logger = logging.getLogger("scalellm.serve")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    drain_timeout: float = 30.0
    max_pending: int = 4096
    log_level: str = "WARNING"


class DrainingServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM after a graceful shutdown (exit -15); a drained server
    exits 0 instead, as process supervisors expect."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_server(engine_config: EngineConfig, serve: ServeConfig) -> int:
    t0 = time.monotonic()
    info = resolve_model_info(engine_config)
    engine = AsyncEngine(engine_config, info, serve.max_pending, serve.log_level)
    backend = EngineBackend(engine, serve.served_model_name or info.model_name)
    app = OpenAIApp(backend, api_key=serve.api_key)
    exit_code = 0
    server: DrainingServer | None = None

    async def start() -> None:
        await engine.start()
        asyncio.get_running_loop().create_task(watch_engine())
        logger.warning("ready: serving %s on http://%s:%d in %.1fs", backend.model_names[0], serve.host, serve.port,
                       time.monotonic() - t0)

    async def watch_engine() -> None:
        nonlocal exit_code
        while engine.is_ready:
            await asyncio.sleep(0.1)
        if server is not None and not server.should_exit:
            logger.error("engine core died (%s); shutting down", engine.client.dead_reason)
            exit_code = 1
            server.should_exit = True

    async def stop() -> None:
        app.draining = True
        await engine.shutdown()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    config = uvicorn.Config(app, host=serve.host, port=serve.port, loop="uvloop", http="httptools", lifespan="on",
                            log_level=serve.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=int(serve.drain_timeout))
    server = DrainingServer(config)
    server.run()
    if not server.started:
        return 1
    return exit_code
