"""Admission control: a global cap on requests in flight with a bounded, priority-
ordered waiting queue. Over capacity a request waits (lower `priority` value first,
then arrival); when the queue is full, or it waited `queue_timeout`, it is refused
with Overloaded (the HTTP layer answers 503 + Retry-After).

Knows nothing of HTTP, keys or backends; one instance per process, used from the
event loop only (no locks).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_concurrency: int = 0  # requests in flight at once; 0: unlimited (the engine queues)
    max_queue: int = 0  # requests waiting for a slot beyond max_concurrency
    queue_timeout: float = 30.0  # seconds a request may wait for a slot

    def __post_init__(self) -> None:
        if self.max_concurrency < 0 or self.max_queue < 0 or self.queue_timeout <= 0:
            raise ValueError("max_concurrency and max_queue must be >= 0 and queue_timeout > 0")


class Overloaded(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Admission:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.in_flight = 0
        self._queue: list[tuple[int, int, asyncio.Future]] = []  # (priority, seq, future)
        self._seq = itertools.count()
        self.num_rejected = 0
        self.num_queued = 0  # total that ever waited

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, f in self._queue if not f.done())

    async def acquire(self, priority: int = 0) -> None:
        cap = self.config.max_concurrency
        if cap == 0 or (self.in_flight < cap and self.waiting == 0):
            self.in_flight += 1
            return
        if self.waiting >= self.config.max_queue:
            self.num_rejected += 1
            raise Overloaded(f"server at capacity ({self.in_flight} requests in flight, "
                             f"{self.waiting} waiting); retry later", self._retry_after())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._seq), fut))
        self.num_queued += 1
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.config.queue_timeout)
        except TimeoutError:
            if fut.done() and not fut.cancelled():  # granted just as the wait timed out
                self.release()
            fut.cancel()
            self.num_rejected += 1
            raise Overloaded(f"no capacity within {self.config.queue_timeout:g}s; retry later",
                             self._retry_after()) from None
        except asyncio.CancelledError:  # the client went away while waiting
            if fut.done() and not fut.cancelled():
                self.release()
            fut.cancel()
            raise
        # the slot was handed over by release(): in_flight already counts it

    def release(self) -> None:
        while self._queue:
            _, _, fut = heapq.heappop(self._queue)
            if not fut.done():
                fut.set_result(None)  # hand the slot over: in_flight unchanged
                return
        self.in_flight -= 1

    def _retry_after(self) -> float:
        return max(1.0, min(self.config.queue_timeout, 1.0 + self.waiting * 0.1))
