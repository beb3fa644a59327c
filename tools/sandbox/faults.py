"""Fault injection: what can go wrong with each fake API, and deciding it per request.

A fault is decided before any API logic runs, so a faulted request never produces an effect; that is
what lets tests assert "the retry, not the first attempt, created the project".
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FaultKind = Literal["5xx", "429", "hang", "down", "fail_next", "lost_response"]
FAULT_KINDS: tuple[FaultKind, ...] = ("5xx", "429", "hang", "down", "fail_next", "lost_response")


class FaultSpec(BaseModel):
    """How one API misbehaves. The default spec is a healthy API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    error_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests answered 503")
    rate_429: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests answered 429")
    retry_after_s: float = Field(1.0, ge=0.0, description="Retry-After of a 429, may be fractional")
    latency_ms: int = Field(0, ge=0, description="Delay added before every answer")
    hang_rate: float = Field(0.0, ge=0.0, le=1.0, description="Share of requests that hang, then 504")
    hang_s: float = Field(30.0, ge=0.0, description="How long a hang lasts; exceed the client timeout")
    fail_next: int = Field(0, ge=0, description="The next N requests are answered 503")
    down: bool = Field(False, description="Every request is answered 503 (an outage)")
    lost_response_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of performed requests whose answer is lost (504 after the effect happened)",
    )

    @model_validator(mode="after")
    def _rates_fit(self) -> FaultSpec:
        # One random draw is split between the three rates so each rate is the exact share of
        # requests it names; that only works while they fit in [0, 1] together.
        if self.hang_rate + self.rate_429 + self.error_rate > 1.0:
            raise ValueError("hang_rate + rate_429 + error_rate must not exceed 1")
        return self

    def is_healthy(self) -> bool:
        return self == FaultSpec()

    def changes(self) -> dict[str, object]:
        """The fields that differ from a healthy API (for compact display)."""
        return self.model_dump(exclude_defaults=True)


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line message naming every offending field, for 400 answers and the CLI."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "spec"
        parts.append(f"{where}: {error['msg']}")
    return "invalid fault spec: " + "; ".join(parts)


class UnknownApiError(KeyError):
    def __init__(self, api: str, known: Iterable[str]) -> None:
        self.api = api
        self.known = tuple(known)
        super().__init__(api)

    def __str__(self) -> str:
        return f"unknown api {self.api!r}; known apis: {', '.join(self.known)}"


@dataclass(frozen=True)
class FaultDecision:
    """What to do with one request. ``kind`` None means answer normally (after ``latency_s``)."""

    kind: FaultKind | None
    latency_s: float = 0.0
    retry_after_s: float = 0.0
    hang_s: float = 0.0
    # Unlike the other faults, this one strikes after the API performed the request: the effect
    # exists, but the caller only sees a 504 and cannot tell. Idempotency keys are the cure.
    lose_response: bool = False


class FaultState:
    """The current FaultSpec of every API plus one seeded random stream per API.

    Each API has its own stream, reseeded whenever its spec is set, so the outcomes of a spec depend
    only on the seed and the requests made to that API since, not on traffic to other APIs.
    """

    def __init__(
        self,
        apis: Iterable[str],
        seed: int = 0,
        lock: threading.RLock | None = None,
    ) -> None:
        self._apis = tuple(apis)
        self._seed = seed
        # The sandbox passes its own lock so fault state, effects and stats change together.
        self._lock = lock if lock is not None else threading.RLock()
        self._specs: dict[str, FaultSpec] = {}
        self._rngs: dict[str, random.Random] = {}
        self.clear()

    @property
    def apis(self) -> tuple[str, ...]:
        return self._apis

    @property
    def seed(self) -> int:
        return self._seed

    def _check(self, api: str) -> None:
        if api not in self._apis:
            raise UnknownApiError(api, self._apis)

    def _rng(self, api: str) -> random.Random:
        # A string seed hashes deterministically (unlike hash()), across processes and runs.
        return random.Random(f"{self._seed}:{api}")

    def get(self, api: str) -> FaultSpec:
        self._check(api)
        with self._lock:
            return self._specs[api]

    def all(self) -> dict[str, FaultSpec]:
        with self._lock:
            return dict(self._specs)

    def set(self, api: str, spec: FaultSpec) -> None:
        self._check(api)
        with self._lock:
            self._specs[api] = spec
            self._rngs[api] = self._rng(api)

    def clear(self) -> None:
        with self._lock:
            self._specs = {api: FaultSpec() for api in self._apis}
            self._rngs = {api: self._rng(api) for api in self._apis}

    def decide(self, api: str) -> FaultDecision:
        """Decide the fate of one request, consuming a ``fail_next`` if it applies."""
        self._check(api)
        with self._lock:
            spec = self._specs[api]
            latency = spec.latency_ms / 1000.0
            if spec.fail_next > 0:
                self._specs[api] = spec.model_copy(update={"fail_next": spec.fail_next - 1})
                return FaultDecision("fail_next", latency)
            if spec.down:
                return FaultDecision("down", latency)
            lose = spec.lost_response_rate > 0 and self._rngs[api].random() < spec.lost_response_rate
            if spec.hang_rate == spec.rate_429 == spec.error_rate == 0.0:
                return FaultDecision(None, latency, lose_response=lose)
            draw = self._rngs[api].random()
        if draw < spec.hang_rate:
            return FaultDecision("hang", latency, hang_s=spec.hang_s)
        if draw < spec.hang_rate + spec.rate_429:
            return FaultDecision("429", latency, retry_after_s=spec.retry_after_s)
        if draw < spec.hang_rate + spec.rate_429 + spec.error_rate:
            return FaultDecision("5xx", latency)
        return FaultDecision(None, latency, lose_response=lose)
