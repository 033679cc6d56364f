"""`scalellm serve --replicas N`: N local replica processes (gRPC only) supervised by
the gateway process. A replica that dies is restarted (its in-flight requests are
retried or resumed by the gateway); the whole group stops together on SIGTERM.

Replicas are started by command line (`scalellm replica ...`), so this module never
imports the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

logger = logging.getLogger("scalellm.launcher")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalReplica:
    index: int
    port: int
    args: list[str]
    global_args: list[str] | None = None  # before the subcommand: --log-level, --log-format
    proc: subprocess.Popen | None = None
    restarts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "scalellm.entrypoints.cli", *(self.global_args or []), "replica", "--no-http",
               "--host", "127.0.0.1",
               "--grpc-port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        logger.warning("replica %d starting on %s (pid %d)", self.index, self.address, self.proc.pid)

    def stop(self, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


class ReplicaGroup:
    def __init__(self, num: int, replica_args: list[str], max_restarts: int = 5,
                 global_args: list[str] | None = None) -> None:
        self.replicas = [LocalReplica(i, free_port(), replica_args, global_args) for i in range(num)]
        self.max_restarts = max_restarts
        self._task: asyncio.Task | None = None

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    def start(self) -> None:
        """Start the replicas not started yet (idempotent)."""
        for r in self.replicas:
            if r.proc is None:
                r.start()

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for r in self.replicas:
                if r.proc is not None and r.proc.poll() is not None:
                    if r.restarts >= self.max_restarts:
                        continue
                    r.restarts += 1
                    logger.error("replica %d exited with %s; restart %d", r.index, r.proc.returncode, r.restarts)
                    r.start()

    def start_supervising(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.supervise())

    def stop(self, timeout: float = 30.0) -> None:
        if self._task is not None:
            self._task.cancel()
        for r in self.replicas:
            r.stop(timeout)
