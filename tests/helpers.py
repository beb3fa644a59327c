"""Test helpers: polling with a deadline instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from streamagent import queries
from streamagent.config import Settings

T = TypeVar("T")


def eventually(probe: Callable[[], T], timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> T:
    """Call ``probe`` until it returns something truthy; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)  # the poll interval of a deadline-bounded wait
    raise AssertionError(f"{what} not reached within {timeout}s; last value: {last!r}")


def ended(settings: Settings, run_ids: list[str]) -> list[queries.RunRow] | None:
    """The projected rows of ``run_ids`` once every one of them has ended, else None (for ``eventually``)."""
    wanted = set(run_ids)
    rows = [r for r in queries.runs(settings, limit=100_000) if r.run_id in wanted]
    return rows if len(rows) == len(run_ids) and all(r.status != "running" for r in rows) else None
