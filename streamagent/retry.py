"""Retry policy: exponential backoff with jitter, capped, honouring Retry-After; shared by tools and processors."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 0.05
    multiplier: float = 2.0
    max_backoff_s: float = 2.0
    # 0 means "until the command's deadline", like Temporal's default activity policy.
    max_attempts: int = 0

    def backoff(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Delay before attempt ``attempt + 1``; ``attempt`` counts from 1."""
        base = min(self.max_backoff_s, self.initial_s * self.multiplier ** (attempt - 1))
        jittered = base * (rng or random).uniform(0.5, 1.0)
        return max(jittered, retry_after or 0.0)

    def exhausted(self, attempt: int) -> bool:
        return self.max_attempts > 0 and attempt >= self.max_attempts
