"""Tensor-parallel group state. Single-process defaults (rank 0 of 1) until a
distributed launcher initialises a group; layers ask here for their shard."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup when tp_size > 1


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


def set_parallel_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


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
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.group)
    return torch.cat(parts, dim=dim)
