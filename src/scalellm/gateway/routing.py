"""Routing policies behind one small interface: pick a replica for a call.

- round_robin: in turn.
- least_load: fewest outstanding requests, counting the gateway's own in-flight
  requests plus the replica's reported running + waiting (whichever is larger).
- power_of_two: two replicas at random, the less loaded one wins.
- prefix_affinity: an approximate prefix tree over the raw prompt text (first
  `prefix_chars` characters, in `chunk_chars` pieces) remembers which replica served
  which prefix, so shared system prompts land where their KV blocks are cached;
  when the chosen replica's load exceeds the least loaded one's by more than
  `imbalance` requests, it falls back to least_load.

- adaptive: replicas are grouped in pools; while the gateway has fewer than
  `threshold` requests in flight, calls go to the low-latency pool (e.g. one replica
  with high tensor parallelism), above it to the high-throughput pool (e.g. many
  small replicas); within a pool an inner policy (least_load) picks. A pool with no
  healthy replica left falls back to the other. The default threshold, 32, is the
  crossover benchmarks/adaptive_pools.py measured on a 2-core CPU for a TP=2 replica
  vs two TP=1 replicas of a SmolLM2-sized model (TP=2 ahead up to 16 in flight, the
  two replicas 10% ahead at 32 and 12% at 64); measure your own pools.

Policies see only ReplicaClient-like objects (address, pool, in_flight, load, healthy).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Protocol

from scalellm.protocol.generation import GenerateCall


class ReplicaView(Protocol):
    address: str
    pool: str
    in_flight: int
    healthy: bool

    @property
    def load(self): ...  # type: ignore[no-untyped-def]


def outstanding(r: ReplicaView) -> int:
    reported = r.load.num_running + r.load.num_waiting
    return max(r.in_flight, reported)


class Policy(Protocol):
    name: str

    def choose(self, replicas: list[ReplicaView], call: GenerateCall) -> ReplicaView: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._i = 0

    def choose(self, replicas: list[ReplicaView], call: GenerateCall) -> ReplicaView:
        r = replicas[self._i % len(replicas)]
        self._i += 1
        return r


class LeastLoad:
    name = "least_load"

    def choose(self, replicas: list[ReplicaView], call: GenerateCall) -> ReplicaView:
        return min(replicas, key=lambda r: (outstanding(r), r.load.kv_blocks_used))


class PowerOfTwo:
    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, replicas: list[ReplicaView], call: GenerateCall) -> ReplicaView:
        if len(replicas) == 1:
            return replicas[0]
        a, b = self._rng.sample(replicas, 2)
        return a if outstanding(a) <= outstanding(b) else b


def prompt_text(call: GenerateCall) -> str:
    if call.messages is not None:
        return "\x00".join(f"{m['role']}\x01{m['content']}" for m in call.messages)
    if isinstance(call.prompt, str):
        return call.prompt
    return " ".join(map(str, call.prompt or []))


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(self, chunk_chars: int = 64, prefix_chars: int = 4096, max_entries: int = 100_000,
                 imbalance: int = 8) -> None:
        self.chunk_chars = chunk_chars
        self.prefix_chars = prefix_chars
        self.imbalance = imbalance
        self.max_entries = max_entries
        # key: text prefix ending at a chunk boundary -> replica address (LRU)
        self._owner: OrderedDict[str, str] = OrderedDict()
        self._fallback = LeastLoad()

    def choose(self, replicas: list[ReplicaView], call: GenerateCall) -> ReplicaView:
        text = prompt_text(call)[: self.prefix_chars]
        keys = [text[:end] for end in range(self.chunk_chars, len(text) + 1, self.chunk_chars)]
        by_addr = {r.address: r for r in replicas}
        chosen = None
        for key in reversed(keys):  # longest known prefix first
            addr = self._owner.get(key)
            if addr in by_addr:
                chosen = by_addr[addr]
                self._owner.move_to_end(key)
                break
        least = self._fallback.choose(replicas, call)
        if chosen is None or outstanding(chosen) - outstanding(least) > self.imbalance:
            chosen = least
        for key in keys:
            self._owner[key] = chosen.address
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
        return chosen


class AdaptivePools:
    name = "adaptive"

    def __init__(self, latency_pool: str = "latency", throughput_pool: str = "throughput", threshold: int = 32,
                 inner: Policy | None = None) -> None:
        if threshold < 1:
            raise ValueError("adaptive threshold must be >= 1")
        self.latency_pool = latency_pool
        self.throughput_pool = throughput_pool
        self.threshold = threshold
        self.inner = inner or LeastLoad()

    def pool_for(self, in_flight: int) -> str:
        return self.latency_pool if in_flight < self.threshold else self.throughput_pool

    def choose(self, replicas: list[ReplicaView], call: GenerateCall) -> ReplicaView:
        want = self.pool_for(sum(r.in_flight for r in replicas))
        pool = [r for r in replicas if r.pool == want]
        return self.inner.choose(pool or replicas, call)


POLICIES = {"round_robin": RoundRobin, "least_load": LeastLoad, "power_of_two": PowerOfTwo,
            "prefix_affinity": PrefixAffinity, "adaptive": AdaptivePools}


def make_policy(name: str, **options: object) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**options)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError(f"bad options for routing policy {name!r}: {e}") from None
