"""A tensor-parallel worker rank (1..N-1): joins the process group, builds its shard
of the model and KV cache, then runs every step the driver sends, forward only.

Started by `worker.executor.MultiprocExecutor` as `python -c` with its RankSpec pickled
on stdin. Death is loud both ways: an error is logged, reported to the driver
(RankFailed) and the process exits 1; if the driver's process dies, the kernel kills
this one (PR_SET_PDEATHSIG) and, as a backstop, the idle loop notices the new parent.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from dataclasses import dataclass

logger = logging.getLogger("scalellm.rank")

IDLE_POLL_MS = 500


@dataclass(frozen=True, slots=True)
class RankSpec:
    """Everything a worker rank needs, decided once by the driver."""

    rank: int
    world_size: int
    model: str | None  # as in EngineConfig.model (None: the embedded default)
    dtype: str  # torch dtype name, already resolved by the driver ("float32", "bfloat16", ...)
    device: str  # this rank's device: "cpu" or "cuda:<rank>"
    block_size: int
    num_blocks: int  # the same on every rank: one scheduler hands out block ids for all
    seed: int
    expert_parallel: bool
    store_port: int  # the driver's TCPStore on 127.0.0.1 (process-group rendezvous)
    timeout_s: float  # process-group timeout: a collective never waits longer
    num_threads: int  # torch intra-op threads of this rank
    step_addr: str  # ZMQ: driver PUSH -> this rank PULL (StepInput, StopRank)
    status_addr: str  # ZMQ: this rank PUSH -> driver PULL (RankReady, RankFailed)
    parent_pid: int
    log_level: int


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def run_worker_rank_process(spec: RankSpec) -> int:
    logging.basicConfig(level=spec.log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s[rank {spec.rank}]: %(message)s")
    _die_with_parent(spec.parent_pid)
    import torch
    import zmq

    from scalellm.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
    from scalellm.protocol import rank_ipc

    torch.set_num_threads(spec.num_threads)
    ctx = zmq.Context()
    steps = ctx.socket(zmq.PULL)
    steps.connect(spec.step_addr)
    status = ctx.socket(zmq.PUSH)
    status.connect(spec.status_addr)
    try:
        from scalellm.loader.model_source import resolve_model
        from scalellm.models.args import parse_model_args
        from scalellm.worker.worker import build_model_runner

        device = torch.device(spec.device)
        init_tensor_parallel(spec.rank, spec.world_size, "127.0.0.1", spec.store_port, device, spec.timeout_s,
                             spec.expert_parallel)
        source = resolve_model(spec.model)
        args = parse_model_args(source.read_config())
        runner = build_model_runner(
            source, args, dtype=getattr(torch, spec.dtype), device=device, block_size=spec.block_size,
            num_blocks=spec.num_blocks, seed=spec.seed, is_driver=False,
        )
        status.send(rank_ipc.encode(rank_ipc.RankReady(spec.rank)))
        _step_loop(runner, steps, spec.parent_pid)
        return 0
    except Exception as e:  # noqa: BLE001 - report anything, then die loudly
        logger.exception("rank %d failed", spec.rank)
        status.send(rank_ipc.encode(rank_ipc.RankFailed(spec.rank, f"{type(e).__name__}: {e}")), flags=zmq.NOBLOCK)
        return 1
    finally:
        destroy_tensor_parallel()
        status.close(linger=500)
        steps.close(linger=0)
        ctx.term()


def _step_loop(runner, steps, parent_pid: int) -> None:  # type: ignore[no-untyped-def]
    import zmq

    from scalellm.protocol import rank_ipc

    while True:
        if not steps.poll(IDLE_POLL_MS, zmq.POLLIN):
            if os.getppid() != parent_pid:
                logger.error("driver process is gone; exiting")
                return
            continue
        msg = rank_ipc.decode_to_rank(steps.recv())
        if isinstance(msg, rank_ipc.StopRank):
            return
        runner.add_sampled_tokens(msg.sampled_token_ids)
        runner.execute(msg.sched)


def main() -> None:
    """Entry of `python -c`: the RankSpec arrives pickled on stdin."""
    spec: RankSpec = pickle.load(sys.stdin.buffer)
    sys.exit(run_worker_rank_process(spec))
