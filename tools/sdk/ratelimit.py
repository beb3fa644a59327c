"""Per-tool rate limits (policy ``[rate_limits] tool = calls per second``), applied before each external call.

A token bucket of one token: calls are paced at least ``1 / rate`` seconds apart, so in any window of
one second a tool process makes at most ``rate + 1`` calls, however many commands it runs at once.
Concurrent callers reserve their slot in arrival order (the bucket may go into debt); each then waits
out its own delay. The rate is read from the policy in force before every reservation, so an edit of
``ops/policies/`` applies to the next call without a restart; a removed limit lets every waiter that
reserves from then on through at once.

The limit is per tool *process* (per member of the tool's consumer group): N members of one tool make
up to N times the rate. Divide the API's limit by the number of members when setting it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from streamagent.policy import PolicyStore


class TokenBucket:
    """One-token bucket, in debt when callers queue. ``reserve(rate)`` returns how long to wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rate: float | None = None
        self.tokens = 1.0
        self.updated = clock()

    def reserve(self, rate: float | None) -> float:
        """Take a token at ``rate`` calls per second (None: unlimited); the seconds to wait before calling."""
        now = self.clock()
        if rate is None or rate <= 0:
            self.rate, self.tokens, self.updated = None, 1.0, now
            return 0.0
        if self.rate is None:  # newly limited: start full, as after an idle second
            self.tokens = 1.0
        else:
            self.tokens = min(1.0, self.tokens + (now - self.updated) * self.rate)
        self.rate, self.updated = rate, now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / rate

    def give_back(self) -> None:
        """Return a reserved token that was not used (the caller gave up instead of calling)."""
        self.tokens = min(1.0, self.tokens + 1.0)


class RateLimiter:
    """The bucket of one tool, at the rate the policy in force gives it."""

    def __init__(self, tool: str, policies: PolicyStore, clock: Callable[[], float] = time.monotonic) -> None:
        self.tool = tool
        self.policies = policies
        self.bucket = TokenBucket(clock)
        self.waits = 0  # reservations that had to wait
        self.waited_s = 0.0  # the sum of those waits

    def reserve(self) -> float:
        delay = self.bucket.reserve(self.policies.current().rate_limit(self.tool))
        if delay > 0:
            self.waits += 1
            self.waited_s += delay
        return delay

    def give_back(self) -> None:
        self.bucket.give_back()
