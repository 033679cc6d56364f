"""Tensor-parallel group state and the collectives layers use.

Single-process defaults (rank 0 of 1) until `init_tensor_parallel` joins a process
group; layers ask `get_parallel_state()` for their shard when they are built and call
the collectives in forward. One tensor-parallel group per process (torch.distributed's
default group): ranks 1..N-1 are worker processes, rank 0 is the engine's own process.

    gloo on CPU: each collective is a few TCP round trips over localhost (~1 ms on
    the 2-core test machine, see benchmarks/README.md); NCCL on GPU.

Knows nothing of models, requests or how ranks are started.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup when tp_size > 1
    # MoE layers split whole experts across the ranks instead of each expert's width
    # (attention and dense MLPs stay tensor-parallel over the same ranks).
    expert_parallel: bool = False


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
    expert_parallel: bool = False, store: object | None = None,
) -> ParallelState:
    """Join the process group (rank 0 passes the TCPStore it serves as `store`) and make
    it this process's parallel state. Every collective fails after `timeout_s` instead of
    waiting forever on a rank that stopped; a rank that died fails it at once (its
    sockets close)."""
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
    state = ParallelState(tp_rank=rank, tp_size=world_size, group=dist.group.WORLD, expert_parallel=expert_parallel)
    set_parallel_state(state)
    return state


def destroy_tensor_parallel() -> None:
    """Leave the process group (if any) and return to single-process state."""
    import torch.distributed as dist

    set_parallel_state(ParallelState())
    if dist.is_initialized():
        dist.destroy_process_group()


def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    state = _STATE
    if state.tp_size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=state.group)
    return x


def tensor_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    state = _STATE
    if state.tp_size == 1:
        return x
    if x.numel() == 0:  # e.g. logits of a step where no request samples: every rank has none
        shape = list(x.shape)
        shape[dim] *= state.tp_size
        return x.new_empty(shape)
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.group)
    return torch.cat(parts, dim=dim)
