"""A circuit breaker per replica.

    closed ──(failure_threshold consecutive failures)──► open
    open ──(cooldown passed)──► half_open ──(probe succeeds)──► closed
                                          └─(probe fails)──► open, cooldown doubled (≤ max_cooldown)

Failures are passive (a call failed on the replica's side: unavailable, internal,
lost mid-stream — never a client error such as a bad parameter, a deadline or a
disconnect) or active (a health probe failed). While open or half-open the replica
gets no new requests; only a probe brings it back, so flapping replicas back off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum


class BreakerState(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, cooldown: float = 1.0, max_cooldown: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or cooldown <= 0 or max_cooldown < cooldown:
            raise ValueError("failure_threshold >= 1 and 0 < cooldown <= max_cooldown")
        self.failure_threshold = failure_threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = cooldown
        self._open_until = 0.0
        self.num_opened = 0

    @property
    def state(self) -> BreakerState:
        if self._state == BreakerState.OPEN and self._clock() >= self._open_until:
            self._state = BreakerState.HALF_OPEN
        return self._state

    def allows_requests(self) -> bool:
        return self.state == BreakerState.CLOSED

    def success(self) -> None:
        """A call or a probe succeeded. Closes a half-open breaker; an open one waits out its cooldown."""
        state = self.state
        if state == BreakerState.CLOSED:
            self._failures = 0
        elif state == BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._cooldown = self.base_cooldown

    def failure(self) -> None:
        state = self.state
        if state == BreakerState.HALF_OPEN:
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            self._trip()
        elif state == BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._trip()

    def trip(self) -> None:
        """Open now (the replica is known to be gone: connection refused, stream lost)."""
        if self.state != BreakerState.OPEN:
            self._trip()

    def _trip(self) -> None:
        self._state = BreakerState.OPEN
        self._open_until = self._clock() + self._cooldown
        self._failures = 0
        self.num_opened += 1
