"""Starts the engine-core process and talks to it over ZMQ from asyncio.

The frontend binds both sockets in a private temp directory (ipc://); the core
connects. A thread waiting on the core's process notices its death at once, and
everything in flight fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import zmq
import zmq.asyncio

from scalellm.engine.config import EngineConfig
from scalellm.protocol import ipc
from scalellm.protocol.step import CoreRequest

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine-core process died; in-flight requests cannot finish."""


class CoreClient:
    def __init__(self, config: EngineConfig, on_outputs: Callable[[ipc.CoreOutputs], None] | None = None,
                 on_death: Callable[[str], None] | None = None, log_level: str = "WARNING") -> None:
        self.config = config
        self._on_outputs: Callable[[ipc.CoreOutputs], None] = on_outputs or (lambda _: None)
        self._on_death: Callable[[str], None] = on_death or (lambda _: None)
        self._log_level = log_level
        self._dir = tempfile.mkdtemp(prefix="scalellm-")
        self._ctx = zmq.asyncio.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._pull = self._ctx.socket(zmq.PULL)
        self.input_addr = f"ipc://{os.path.join(self._dir, 'in')}"
        self.output_addr = f"ipc://{os.path.join(self._dir, 'out')}"
        self._push.bind(self.input_addr)
        self._pull.bind(self.output_addr)
        self.proc: subprocess.Popen | None = None
        self.load = ipc.EngineLoad()
        self.expert_tokens: dict[int, list[int]] = {}  # MoE: tokens routed per expert per layer, since start
        self.dead_reason: str | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._proc_alive()

    def _proc_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _join(self, timeout: float | None = None) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def bind(self, on_outputs: Callable[[ipc.CoreOutputs], None], on_death: Callable[[str], None]) -> None:
        """Who gets the core's outputs and its death (set before start())."""
        self._on_outputs, self._on_death = on_outputs, on_death

    def spawn(self) -> None:
        """Start the engine-core process now (idempotent). `scalellm replica` calls this
        before importing its HTTP/gRPC frontend, so the core's torch import and weight
        loading overlap the frontend's own start-up; its ready message waits in ZMQ."""
        if self.proc is None:
            # NOTE: a plain subprocess, not multiprocessing's "spawn": that also starts a
            # resource-tracker process (12 MiB) nothing here needs. The core notices its
            # parent's death itself (see core_process).
            self.proc = subprocess.Popen([sys.executable, "-c", "from scalellm.server.core_process import main; main()"],
                                         stdin=subprocess.PIPE)
            assert self.proc.stdin is not None
            self.proc.stdin.write(pickle.dumps((self.config, self.input_addr, self.output_addr, self._log_level)))
            self.proc.stdin.close()

    async def start(self, timeout: float = 600.0) -> None:
        self.spawn()
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        death = loop.run_in_executor(None, self._join)
        ready = asyncio.ensure_future(self._pull.recv())
        done, _ = await asyncio.wait({ready, death}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            self.close()
            raise EngineDeadError(f"engine core exited with code {self.proc.returncode} before it was ready")
        msg = ipc.decode_from_core(ready.result())
        if isinstance(msg, ipc.CoreFailed):
            self.close()
            raise EngineDeadError(f"engine core failed to start: {msg.message}")
        if isinstance(msg, ipc.CoreReady):
            self.load = msg.load
        self._tasks = [asyncio.create_task(self._output_loop()), asyncio.create_task(self._watch(death))]

    async def _output_loop(self) -> None:
        while True:
            msg = ipc.decode_from_core(await self._pull.recv())
            if isinstance(msg, ipc.CoreOutputs):
                self.load = msg.load
                if msg.expert_load:
                    self._add_expert_load(msg.expert_load)
                self._on_outputs(msg)
            elif isinstance(msg, ipc.CoreFailed):
                self._died(f"engine core failed: {msg.message}")

    def _add_expert_load(self, delta: dict[int, list[int]]) -> None:
        for layer, counts in delta.items():
            total = self.expert_tokens.setdefault(layer, [0] * len(counts))
            for e, n in enumerate(counts):
                total[e] += n

    async def _watch(self, death: asyncio.Future) -> None:
        await death
        self._died(f"engine core process exited with code {self.proc.returncode if self.proc else None}")

    def _died(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            logger.error("%s", reason)
            self._on_death(reason)

    async def add(self, requests: list[CoreRequest]) -> None:
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        await self._push.send(ipc.encode(ipc.AddRequests(requests)))

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids and not self.dead_reason:
            await self._push.send(ipc.encode(ipc.AbortRequests(request_ids)))

    async def shutdown(self, timeout: float = 5.0) -> None:
        for t in self._tasks:
            t.cancel()
        if self._proc_alive():
            if self.dead_reason is None:
                # NOTE: never block here: a core that is exiting on its own has closed its
                # socket, and a PUSH with no peer would wait forever.
                try:
                    await self._push.send(ipc.encode(ipc.Shutdown()), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
            await asyncio.get_running_loop().run_in_executor(None, self._join, timeout)
            if self._proc_alive():
                self.proc.terminate()
        self.close()

    def close(self) -> None:
        if self._proc_alive():
            self.proc.kill()
            self.proc.wait()
        self._push.close(linger=0)
        self._pull.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
