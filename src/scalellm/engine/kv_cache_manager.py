"""Per-request block tables over the block pool, with prefix-cache lookups.

Knows tokens and blocks, not tensors. A request's token regions:

    |<-- cache hits -->|<-- computed -->|<-- new this step -->|<- free slots ->|
    |  block 0 | block 1 | block 2 | block 3 (partially full)  |
    `allocate_slots` makes sure blocks exist for computed + new tokens.

Full blocks are hashed as a chain: hash(block i) = H(hash(block i-1) || token ids of
block i), so one hash names the whole prefix up to and including that block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from scalellm.engine.block_pool import BlockPool, KVBlock
from scalellm.engine.request import Request

_ROOT_HASH = b"scalellm-prefix-root"


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or _ROOT_HASH)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True)
class PrefixCacheStats:
    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 resident_blocks: int | None = None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching, resident_blocks=resident_blocks)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self.stats = PrefixCacheStats()

    # -- queries ---------------------------------------------------------------
    def block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """Block table of a request, from block `start` on (the new blocks of a step)."""
        return [b.block_id for b in self._req_blocks.get(request_id, ())[start:]]

    def num_blocks(self, request_id: str) -> int:
        return len(self._req_blocks.get(request_id, ()))

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks

    def _update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to cover every full block of its known tokens."""
        s = self.block_size
        hashes = request.block_hashes
        num_full = request.num_tokens // s
        tokens = request.all_token_ids
        while len(hashes) < num_full:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * s : (i + 1) * s]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest chain of cached blocks for a request that has none yet.

        At least one token is always left to compute, so the step yields logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.stats.num_queried_tokens += request.num_tokens
        self.stats.num_hit_tokens += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # -- changes ---------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[KVBlock] = ()
    ) -> bool:
        """Make room for `num_new_tokens` after the computed (and cache-hit) tokens.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        blocks = self._req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        needed_blocks = -(-(num_computed + num_new_tokens) // self.block_size)
        num_to_allocate = needed_blocks - len(blocks) - len(cached_blocks)
        num_to_allocate = max(num_to_allocate, 0)
        if num_to_allocate + self.pool.num_revivals(cached_blocks) > self.pool.num_free_blocks:
            if not blocks:
                del self._req_blocks[request.request_id]
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            blocks.extend(cached_blocks)
        if num_to_allocate:
            blocks.extend(self.pool.allocate(num_to_allocate))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        blocks = self._req_blocks.get(request.request_id)
        if not blocks:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        if num_full == 0:
            return
        self._update_block_hashes(request)
        for i in range(num_full):
            if blocks[i].block_hash is None:
                self.pool.cache_block(blocks[i], request.block_hashes[i])

    def free(self, request: Request) -> None:
        """Return all of a request's blocks to the pool at once (finish, abort, preempt)."""
        blocks = self._req_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
