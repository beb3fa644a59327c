"""A circuit breaker per downstream API.

Closed: calls flow, consecutive failures are counted. Open: nobody calls for ``cooldown_s``;
commands wait (they are neither lost nor failed). Half-open: one probe goes through; success
closes the breaker, failure opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import IntEnum

from streamagent.metrics import CIRCUIT_STATE

log = logging.getLogger(__name__)


class BreakerState(IntEnum):
    closed = 0
    half_open = 1
    open = 2


class CircuitBreaker:
    def __init__(self, name: str, failure_threshold: int = 5, cooldown_s: float = 2.0) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.state = BreakerState.closed
        self.failures = 0
        self.opened_at = 0.0
        self.opened_count = 0
        self._changed = asyncio.Condition()
        CIRCUIT_STATE.labels(name).set(0)

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            log.warning(
                "circuit %s: %s -> %s",
                self.name,
                self.state.name,
                state.name,
                extra={"circuit": self.name, "state": state.name},
            )
        self.state = state
        CIRCUIT_STATE.labels(self.name).set(int(state))

    async def acquire(self, deadline: float) -> bool:
        """Wait until a call may go out. False if ``deadline`` (monotonic) passes first."""
        async with self._changed:
            while True:
                if self.state is BreakerState.closed:
                    return True
                now = time.monotonic()
                if self.state is BreakerState.open and now >= self.opened_at + self.cooldown_s:
                    self._set(BreakerState.half_open)
                    return True  # this caller is the probe
                if now >= deadline:
                    return False
                wake = self.opened_at + self.cooldown_s if self.state is BreakerState.open else deadline
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=max(0.01, min(wake, deadline) - now))

    async def success(self) -> None:
        async with self._changed:
            self.failures = 0
            if self.state is not BreakerState.closed:
                self._set(BreakerState.closed)
                self._changed.notify_all()

    async def failure(self) -> None:
        async with self._changed:
            self.failures += 1
            if self.state is BreakerState.half_open or (
                self.state is BreakerState.closed and self.failures >= self.failure_threshold
            ):
                self.opened_at = time.monotonic()
                self.opened_count += 1
                self._set(BreakerState.open)
                self._changed.notify_all()
