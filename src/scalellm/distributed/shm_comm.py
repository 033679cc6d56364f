"""All-reduce and all-gather for CPU ranks on one machine through shared memory.

Why: between two local processes gloo's all_reduce of one decode step's activations
took ~2 ms on the 2-core test machine, and even a gloo isend/irecv exchange ~0.35 ms
in a tight loop (1.5 ms inside a real forward): every hop wakes a gloo thread. Here the
calling thread copies its part into shared memory and spins until the others' parts are
there; no thread wakes (numbers in benchmarks/README.md).

Layout of the one mapping all ranks share (a file in /dev/shm, unlinked once mapped):

    | seq r0 | seq r1 | ... (one 64-byte line per rank) | buf 0: slot r0 | slot r1 | ... | buf 1: slot r0 | ... |
                                                           each slot SLOT_BYTES

    Collective number `seq` (1, 2, ...) uses buffer seq % 2. A rank copies its part into
    its slot, then publishes `seq` in its line; once every line shows >= seq, it reads all
    slots and adds (or concatenates) them in rank order: every rank gets the same bits.
    Two buffers make reuse safe without a second barrier: a rank writes buffer b at seq
    only after seeing every rank publish seq - 1, which each did after reading buffer b
    at seq - 2. Tensors larger than a slot go through in slot-sized pieces.

NOTE: correct on x86-64 only (stores are seen in program order: data before the
counter); elsewhere parallel_state uses gloo. A wait longer than the process-group
timeout, or a peer found dead by the liveness check, raises instead of spinning on.

Knows nothing of models or of how ranks were started.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from collections.abc import Callable

import numpy as np
import torch

SLOT_BYTES = 4 << 20
_LINE = 64  # bytes per rank's counter (a cache line: no false sharing)
_SPIN_BEFORE_YIELD = 200  # polls before yielding the core between polls
_CHECK_EVERY_S = 0.05  # how often a long wait checks the clock and the liveness callback


class ShmCommunicator:
    def __init__(self, rank: int, world_size: int, path: str, create: bool, timeout_s: float,
                 is_alive: Callable[[], None] | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self.is_alive = is_alive  # raises when a peer is known dead (set by the executor on rank 0)
        header = _LINE * world_size
        size = header + 2 * world_size * SLOT_BYTES
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._seqs = np.frombuffer(self._mm, dtype=np.int64, count=header // 8)[:: _LINE // 8]  # [world]
        self._data = torch.frombuffer(self._mm, dtype=torch.uint8, offset=header)  # [2 * world * SLOT_BYTES]
        self._seq = 0

    @staticmethod
    def new_path() -> str:
        root = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
        return os.path.join(root, f"scalellm-tp-{uuid.uuid4().hex}")

    def close(self) -> None:
        del self._seqs, self._data
        try:
            self._mm.close()
        except BufferError:  # a view still alive (e.g. in a failed step's traceback): unmapped when it goes
            pass

    # -- collectives -------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.contiguous().view(-1)
        out = torch.empty_like(flat)
        for start, n, slots in self._rounds(flat):
            dst = out[start : start + n]
            torch.add(slots[0], slots[1], out=dst)
            for slot in slots[2:]:
                dst += slot
        return out.view(x.shape)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        flat = x.contiguous().view(-1)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        for start, n, slots in self._rounds(flat):
            for part, slot in zip(parts, slots):
                part[start : start + n].copy_(slot)
        return torch.cat([p.view(x.shape) for p in parts], dim=dim)

    def _rounds(self, flat: torch.Tensor):  # type: ignore[no-untyped-def]
        """For each slot-sized piece of `flat`: publish it, wait for all ranks' pieces and
        yield (offset, length, [every rank's piece, in rank order]) to read from."""
        per_slot = SLOT_BYTES // flat.element_size()
        for start in range(0, max(flat.numel(), 1), per_slot):
            n = min(per_slot, flat.numel() - start)
            self._seq += 1
            buf = self._seq % 2
            slots = [self._slot(buf, r, flat.dtype, n) for r in range(self.world_size)]
            slots[self.rank].copy_(flat[start : start + n])
            self._seqs[self.rank] = self._seq
            self._wait(self._seq)
            yield start, n, slots

    def _slot(self, buf: int, rank: int, dtype: torch.dtype, n: int) -> torch.Tensor:
        offset = (buf * self.world_size + rank) * SLOT_BYTES
        return self._data[offset : offset + SLOT_BYTES].view(dtype)[:n]

    def _wait(self, seq: int) -> None:
        seqs = self._seqs
        spins = 0
        started = next_check = 0.0
        while seqs.min() < seq:
            spins += 1
            if spins < _SPIN_BEFORE_YIELD:
                continue
            os.sched_yield()  # NOTE: cores may be shared with other work; let it run
            now = time.monotonic()
            if not started:
                started, next_check = now, now + _CHECK_EVERY_S
            elif now >= next_check:
                next_check = now + _CHECK_EVERY_S
                if self.is_alive is not None:
                    self.is_alive()
                if now - started > self.timeout_s:
                    late = [r for r in range(self.world_size) if seqs[r] < seq]
                    raise RuntimeError(f"shared-memory collective {seq}: ranks {late} did not arrive "
                                       f"within {self.timeout_s:.0f}s")
