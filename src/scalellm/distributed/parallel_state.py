"""Tensor-parallel group state and the collectives layers use.

Single-process defaults (rank 0 of 1) until `init_tensor_parallel` joins a process
group; layers ask `get_parallel_state()` for their shard when they are built and call
the collectives in forward. One tensor-parallel group per process (torch.distributed's
default group): ranks 1..N-1 are worker processes, rank 0 is the engine's own process.

    NCCL on GPU: its all-reduce and all-gather.
    CPU (x86-64): shared memory (shm_comm.py); gloo's all_reduce of one decode step's
    activations took ~2 ms between two local processes on the 2-core test machine.
    CPU elsewhere: gloo, built from an exchange of the ranks' parts (isend/irecv for 2
    ranks, all_gather beyond; ~0.35 ms in a tight loop) and a sum in rank order.
    Either CPU path gives every rank the same bits.

Knows nothing of models, requests or how ranks are started.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scalellm.distributed.shm_comm import ShmCommunicator


@dataclass(frozen=True, slots=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup when tp_size > 1
    # MoE layers split whole experts across the ranks instead of each expert's width
    # (attention and dense MLPs stay tensor-parallel over the same ranks).
    expert_parallel: bool = False
    shm: ShmCommunicator | None = None  # CPU ranks on x86-64: collectives through shared memory


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


def set_parallel_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tensor_parallel(
    rank: int, world_size: int, store_host: str, store_port: int, device: torch.device, timeout_s: float,
    expert_parallel: bool = False, store: object | None = None, is_alive: Callable[[], None] | None = None,
) -> ParallelState:
    """Join the process group (rank 0 passes the TCPStore it serves as `store`) and make
    it this process's parallel state. Every collective fails after `timeout_s` instead of
    waiting forever on a rank that stopped; a rank that died fails it at once (gloo: its
    sockets close; shared memory: `is_alive`, which raises for a dead peer, is polled
    while waiting)."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a tensor-parallel group; shut the other engine down first")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(store_host, store_port, world_size, False, timeout=timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size,  # type: ignore[arg-type]
                            timeout=timeout)
    shm = None
    if device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64"):
        shm = _map_shared_memory(rank, world_size, store, timeout_s, is_alive)
    state = ParallelState(tp_rank=rank, tp_size=world_size, group=dist.group.WORLD, expert_parallel=expert_parallel,
                          shm=shm)
    set_parallel_state(state)
    return state


def _map_shared_memory(rank: int, world_size: int, store, timeout_s: float,  # type: ignore[no-untyped-def]
                       is_alive: Callable[[], None] | None) -> ShmCommunicator:
    """Rank 0 creates the file, every rank maps it, then rank 0 unlinks it: nothing is
    left behind in /dev/shm, whoever dies later."""
    import torch.distributed as dist

    if rank == 0:
        path = ShmCommunicator.new_path()
        shm = ShmCommunicator(rank, world_size, path, True, timeout_s, is_alive)
        store.set("scalellm_shm_path", path)
    else:
        path = store.get("scalellm_shm_path").decode()
        shm = ShmCommunicator(rank, world_size, path, False, timeout_s, is_alive)
    dist.barrier()
    if rank == 0:
        os.unlink(path)
    return shm


def destroy_tensor_parallel() -> None:
    """Leave the process group (if any) and return to single-process state."""
    import torch.distributed as dist

    if _STATE.shm is not None:
        _STATE.shm.close()
    set_parallel_state(ParallelState())
    if dist.is_initialized():
        dist.destroy_process_group()


def _exchange(x: torch.Tensor, state: ParallelState) -> list[torch.Tensor]:
    """Every rank's `x` (same shape on all ranks), in rank order."""
    import torch.distributed as dist

    x = x.contiguous()
    if state.tp_size == 2:
        peer = 1 - state.tp_rank
        other = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, peer, state.group), dist.P2POp(dist.irecv, other, peer, state.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return [x, other] if state.tp_rank == 0 else [other, x]
    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x, group=state.group)
    return parts


def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's `x`; may return a new tensor (use the result)."""
    state = _STATE
    if state.tp_size == 1:
        return x
    import torch.distributed as dist

    if x.is_cuda:
        dist.all_reduce(x, group=state.group)
        return x
    if state.shm is not None:
        return state.shm.all_reduce(x)
    parts = _exchange(x, state)
    out = parts[0] + parts[1]
    for p in parts[2:]:
        out += p
    return out


def tensor_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    state = _STATE
    if state.tp_size == 1:
        return x
    if x.numel() == 0:  # e.g. logits of a step where no request samples: every rank has none
        shape = list(x.shape)
        shape[dim] *= state.tp_size
        return x.new_empty(shape)
    import torch.distributed as dist

    if x.is_cuda:
        parts = [torch.empty_like(x) for _ in range(state.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=state.group)
    elif state.shm is not None:
        return state.shm.all_gather(x, dim)
    else:
        parts = _exchange(x, state)
    return torch.cat(parts, dim=dim)
