"""The KV block pool: fixed-size blocks with reference counts and a prefix cache.

Bookkeeping only (ints and hashes); the tensors that hold K/V live in the worker.

    free queue (LRU, evict from the left)      cached: block_hash -> block
    [b7][b3][b9] ... [b2]   <- freed blocks appended on the right

A block with ref_cnt 0 sits in the free queue; if it still carries a hash it is a
cached block that a later request may revive ("touch") until it is evicted, i.e.
handed out again by `allocate`.

Blocks never handed out yet ("fresh": ids next_fresh.. in order) are not in the queue:
their memory has not been touched (a CPU cache is mapped lazily). `allocate` takes fresh
blocks while fewer than `resident_blocks` have ever been handed out, then prefers evicting
the queue's oldest to touching more: past that budget the pool grows only while live
requests hold every touched block. Memory then follows max(budget, peak live need), not
the pool's size, and the prefix cache keeps what fits the budget. When idle,
`shrink_to_budget` makes the free blocks past it fresh again for their memory to be
handed back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and cached


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, resident_blocks: int | None = None) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # fresh blocks are handed out freely up to this many touched ones (None: the whole pool)
        self.resident_blocks = num_blocks if resident_blocks is None else max(0, min(num_blocks, resident_blocks))
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict()  # touched blocks with ref_cnt 0, LRU first
        self._next_fresh = 0  # blocks [_next_fresh, num_blocks) were never handed out
        self._cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, possibly evicting a cached one, or fresh)."""
        return len(self._free) + self.num_blocks - self._next_fresh

    @property
    def num_used_blocks(self) -> int:
        return self._next_fresh - len(self._free)

    @property
    def num_touched_blocks(self) -> int:
        """Blocks ever handed out: those whose memory is resident (on CPU)."""
        return self._next_fresh

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, num: int) -> list[KVBlock]:
        """Take `num` blocks: fresh ones while under the resident budget (or when the free
        queue is empty), else from the front of the free queue (least recently freed)."""
        if num > self.num_free_blocks:
            raise RuntimeError(f"asked for {num} blocks, only {self.num_free_blocks} free")
        out = []
        for _ in range(num):
            if self._next_fresh < self.num_blocks and (self._next_fresh < self.resident_blocks or not self._free):
                block = self.blocks[self._next_fresh]
                self._next_fresh += 1
            else:
                _, block = self._free.popitem(last=False)
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        """Drop a block's prefix-cache entry, if it has one."""
        if block.block_hash is not None:
            # NOTE: evicting only drops the mapping if it still points at this block.
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1

    def shrink_to_budget(self) -> tuple[int, int] | None:
        """Make the free blocks at the top of the touched range fresh again, down to the
        resident budget or the highest block in use, dropping their cache entries; returns
        the ids [lo, hi) whose memory the caller may hand back (None: nothing). For idle
        time: the memory a peak of live requests took past the budget."""
        hi = lo = self._next_fresh
        while lo > self.resident_blocks and self.blocks[lo - 1].ref_cnt == 0:
            lo -= 1
        if lo == hi:
            return None
        for block in self.blocks[lo:hi]:
            del self._free[block.block_id]
            self._evict(block)
        self._next_fresh = lo
        return lo, hi

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache-hit blocks, reviving those sitting in the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def num_revivals(self, blocks: Iterable[KVBlock]) -> int:
        """How many of these cache hits are in the free queue (touching them uses free slots)."""
        return sum(1 for b in blocks if b.ref_cnt == 0)

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block; blocks reaching 0 join the free queue's tail,
        in the order given (so pass a request's blocks tail-first: its head blocks, the
        most shareable ones, are then evicted last)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than allocated")
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full, computed block under its chain hash."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # another request computed the same block first; keep that one
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
