"""`scalellm gateway`: the OpenAI HTTP front (shared scalellm.api app) over gRPC
channels to replicas, with a routing policy. Drains on SIGTERM like the replica.
With an OTLP endpoint configured, traces each request (scalellm.api.tracing)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import uvicorn

from scalellm.api.app import OpenAIApp
from scalellm.api.guard import Guard
from scalellm.api.tracing import Tracing
from scalellm.api.uvicorn_server import DrainingServer
from scalellm.gateway.admin import AdminAPI
from scalellm.gateway.backend import GatewayBackend
from scalellm.gateway.config import GatewayConfig, ReplicaSpec
from scalellm.gateway.launcher import ReplicaGroup
from scalellm.gateway.replica_client import ReplicaClient
from scalellm.gateway.routing import make_policy

logger = logging.getLogger("scalellm.gateway")


def build_app(config: GatewayConfig, group: ReplicaGroup | None = None) -> tuple[OpenAIApp, GatewayBackend]:
    if not config.replicas:
        raise ValueError("the gateway needs at least one replica: --replica HOST:PORT or [[replicas]] in --config")
    clients = [ReplicaClient(r.address, r.pool, mux=config.grpc_mux) for r in config.replicas]
    backend = GatewayBackend(clients, make_policy(config.policy, **config.policy_options), config.max_retries,
                             mux=config.grpc_mux)
    guard = Guard(config.safety, config.admission)
    tracing = Tracing("scalellm-gateway", config.otlp_endpoint) if config.otlp_endpoint else None
    app = OpenAIApp(backend, guard=guard, tracing=tracing)
    AdminAPI(backend, config.admin_key, config.drain_timeout).install(app)
    if guard.open:
        logger.warning("no API keys configured: the gateway is open to anyone who can reach it "
                       "(set --api-key-file, SCALELLM_API_KEYS or [auth] in --config)")

    async def start() -> None:
        if group is not None:
            group.start_supervising()
        for c in clients:
            await c.start()
        for _ in range(600 if group is None else 3000):  # wait for the first replica to report in
            if backend.is_ready():
                break
            await asyncio.sleep(0.1)
        logger.warning("gateway on http://%s:%d routing %s over %d replicas (%d healthy)", config.host, config.port,
                       config.policy, len(clients), sum(c.healthy for c in clients))

    async def stop() -> None:
        app.draining = True
        for c in backend.replicas:
            await c.close()
        if group is not None:
            await asyncio.get_running_loop().run_in_executor(None, group.stop, config.drain_timeout)
        if tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)  # export what is left

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app, backend


def run_gateway(config: GatewayConfig, group: ReplicaGroup | None = None) -> int:
    """Serve until SIGTERM. With `group`, its local replicas start first and stop last."""
    if group is not None:
        group.start()
        config = replace(config, replicas=tuple(ReplicaSpec(a) for a in group.addresses))
    try:
        return _serve(config, group)
    finally:
        if group is not None:
            group.stop(config.drain_timeout)


def _serve(config: GatewayConfig, group: ReplicaGroup | None) -> int:
    app, _ = build_app(config, group)
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, loop="uvloop", http="httptools",
                                           lifespan="on", log_level=config.log_level.lower(), access_log=False,
                                           timeout_graceful_shutdown=int(config.drain_timeout)))
    server.run()
    return 0 if server.started else 1
