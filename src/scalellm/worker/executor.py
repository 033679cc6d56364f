"""Tensor/expert-parallel execution: rank 0 (the driver) in this process, ranks 1..N-1 in
worker processes it starts and watches.

    engine core ── execute(SchedulerOutput) ──► MultiprocExecutor (rank 0)
                                                 │ StepInput over ZMQ, one msgpack copy per rank:
                                                 │ the SchedulerOutput + last step's sampled tokens
                                                 ▼
                            rank 0 ModelRunner ◄─┼─► rank r ModelRunner (rank_process.py)
                                     same forward on each rank's shard; the layers'
                                     all-reduces/all-gathers go over torch.distributed
                                     (gloo on CPU, NCCL on GPU); only rank 0 samples

Failure is loud and quick: a rank that exits is seen by the next `check_health` (the
engine core calls it every idle poll and before every step) or by the collective it
leaves behind (its sockets close); a rank that hangs fails the collective after the
process-group timeout. Either way `RankFailedError` names the rank and its exit code or
error, and the engine's process exits non-zero. Ranks die with the driver's process.

One tensor-parallel engine per process (torch.distributed's default group). Knows
nothing of scheduling or requests beyond the step contract.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import zmq

from scalellm.distributed.parallel_state import backend_for, destroy_tensor_parallel, init_tensor_parallel
from scalellm.loader.model_source import ModelSource
from scalellm.models.args import ModelArgs
from scalellm.protocol import rank_ipc
from scalellm.protocol.errors import ScaleLLMError
from scalellm.protocol.step import ModelRunnerOutput, SchedulerOutput
from scalellm.worker.model_runner import ModelRunner
from scalellm.worker.rank_process import RankSpec
from scalellm.worker.worker import build_model_runner

logger = logging.getLogger(__name__)

# NOTE: the longest a collective may wait for a slow rank (one layer of the largest
# prefill chunk is far below this on CPU); a rank that *died* fails it at once.
COLLECTIVE_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 600.0  # worker ranks loading their shard of the weights
STOP_TIMEOUT_S = 5.0


class RankFailedError(ScaleLLMError):
    """A tensor-parallel worker rank died, failed or hung; the engine cannot continue."""


def threads_per_rank(tp_size: int) -> int:
    """This machine's cores (as this process may use them) split evenly across the ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // tp_size)


class MultiprocExecutor:
    def __init__(
        self,
        source: ModelSource,
        args: ModelArgs,
        *,
        model: str | None,
        tp_size: int,
        expert_parallel: bool,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        num_blocks: int,
        seed: int,
    ) -> None:
        self.tp_size = tp_size
        self._closed = False
        self._procs: list[subprocess.Popen] = []
        self._sampled: dict[str, int] = {}
        self._threads_before = torch.get_num_threads()
        self._dir = tempfile.mkdtemp(prefix="scalellm-tp-")
        self._ctx = zmq.Context()
        self._status = self._ctx.socket(zmq.PULL)
        status_addr = f"ipc://{os.path.join(self._dir, 'status')}"
        self._status.bind(status_addr)
        self._steps: list[zmq.Socket] = []
        atexit.register(self.shutdown)
        try:
            timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
            import torch.distributed as dist

            store = dist.TCPStore("127.0.0.1", 0, tp_size, True, timeout=timeout, wait_for_workers=False)
            num_threads = threads_per_rank(tp_size)
            for rank in range(1, tp_size):
                sock = self._ctx.socket(zmq.PUSH)
                step_addr = f"ipc://{os.path.join(self._dir, f'step-{rank}')}"
                sock.bind(step_addr)
                self._steps.append(sock)
                spec = RankSpec(
                    rank=rank, world_size=tp_size, model=model, dtype=str(dtype).removeprefix("torch."),
                    device=_rank_device(device, rank), block_size=block_size, num_blocks=num_blocks, seed=seed,
                    expert_parallel=expert_parallel, store_port=store.port, timeout_s=COLLECTIVE_TIMEOUT_S,
                    num_threads=num_threads, step_addr=step_addr, status_addr=status_addr, parent_pid=os.getpid(),
                    log_level=logging.getLogger().getEffectiveLevel(),
                )
                self._procs.append(_spawn_rank(spec))
            logger.info("tensor parallel: %d ranks (%s), %d torch threads each, expert parallel %s",
                        tp_size, backend_for(device), num_threads, "on" if expert_parallel else "off")
            try:
                init_tensor_parallel(0, tp_size, "127.0.0.1", store.port, _rank_device_obj(device, 0),
                                     COLLECTIVE_TIMEOUT_S, expert_parallel, store=store, is_alive=self.check_health)
            except Exception as e:
                self.check_health()  # a rank that never joined says why
                raise RankFailedError(f"tensor-parallel ranks did not join the process group: {e}") from e
            torch.set_num_threads(num_threads)
            self.runner: ModelRunner = build_model_runner(
                source, args, dtype=dtype, device=_rank_device_obj(device, 0), block_size=block_size,
                num_blocks=num_blocks, seed=seed,
            )
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise

    # -- what the engine core sees (the ModelRunner's executor interface) ------------
    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def timings(self):  # type: ignore[no-untyped-def]
        return self.runner.timings

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.check_health()
        msg = rank_ipc.encode(rank_ipc.StepInput(sched, self._sampled))
        for sock in self._steps:
            sock.send(msg)
        try:
            out = self.runner.execute(sched)
        except Exception as e:  # a collective failed: name the rank that caused it
            self._raise_rank_failure(e)
        self._sampled = out.sampled_token_ids
        return out

    def read_expert_load(self) -> dict[int, list[int]]:
        return self.runner.read_expert_load()  # routing is replicated: rank 0 counts every expert

    def kernels_ready(self) -> bool:
        return self.runner.kernels_ready()  # rank 0's (the other ranks compile at the same pace)

    def drop_start_up_pages(self) -> int:
        return self.runner.drop_start_up_pages()  # this process's (rank 0's) only

    def prefault_kv(self, max_blocks: int = 8, upto: int | None = None) -> bool:
        return False  # the ranks' caches fill on use (the idle work would have to run on every rank)

    def release_kv(self, lo: int, hi: int) -> int:
        return 0  # the ranks keep theirs (the pool hands the blocks out as fresh all the same)

    def check_health(self) -> None:
        """Raise RankFailedError if any worker rank exited or reported a failure."""
        while True:
            try:
                msg = rank_ipc.decode_from_rank(self._status.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            if isinstance(msg, rank_ipc.RankFailed):
                raise RankFailedError(f"tensor-parallel rank {msg.rank} failed: {msg.message}")
        for rank, proc in enumerate(self._procs, start=1):
            code = proc.poll()
            if code is not None:
                raise RankFailedError(f"tensor-parallel rank {rank} exited with code {code}")

    def shutdown(self) -> None:
        """Stop the worker ranks (politely, then by force), leave the process group."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        for sock in self._steps:
            try:
                sock.send(rank_ipc.encode(rank_ipc.StopRank()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        destroy_tensor_parallel()
        torch.set_num_threads(self._threads_before)
        for sock in [*self._steps, self._status]:
            sock.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- internals ------------------------------------------------------------------
    def _wait_ready(self) -> None:
        waiting = set(range(1, self.tp_size))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise RankFailedError(f"tensor-parallel ranks {sorted(waiting)} not ready after {READY_TIMEOUT_S:.0f}s")
            if self._status.poll(100, zmq.POLLIN):
                msg = rank_ipc.decode_from_rank(self._status.recv())
                if isinstance(msg, rank_ipc.RankFailed):
                    raise RankFailedError(f"tensor-parallel rank {msg.rank} failed to start: {msg.message}")
                waiting.discard(msg.rank)
            else:
                self.check_health()

    def _raise_rank_failure(self, error: Exception) -> None:
        """A step failed on rank 0. If a worker rank died or failed (its exit and its
        RankFailed message may trail the broken collective a little), say which."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            self.check_health()
            time.sleep(0.05)
        raise error


def _rank_device(device: torch.device, rank: int) -> str:
    return f"cuda:{rank}" if device.type == "cuda" else device.type


def _rank_device_obj(device: torch.device, rank: int) -> torch.device:
    return torch.device(_rank_device(device, rank))


def _spawn_rank(spec: RankSpec) -> subprocess.Popen:
    # NOTE: not multiprocessing: the engine-core process is a daemon, and daemons may not
    # have multiprocessing children. A fresh interpreter is what "spawn" does anyway.
    # The rank dies with the *thread* that starts it (PR_SET_PDEATHSIG): build a
    # tensor-parallel engine from a thread that outlives it (the main thread, usually).
    proc = subprocess.Popen([sys.executable, "-c", "from scalellm.worker.rank_process import main; main()"],
                            stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(pickle.dumps(spec))
    proc.stdin.close()
    return proc
