"""A run's events in causal order: an event is never listed before the event that caused it.

Timestamps alone cannot give that order. ``occurred_at`` keeps milliseconds only (the wire's
precision), events come from several processes and topics (a command sits on its tool's topic, its
decision on the run's log, so neither Kafka offsets nor the projection's arrival order relate them),
and a processor may stamp an effect before its cause: the decision processor builds a command before
the ``DecisionRecorded`` that records it, so the command's millisecond can be the earlier one. The
envelope's ``causation_id`` is what does relate them, so the order is a topological one: among the
events whose cause is already listed (or is not in the run's timeline), the earliest comes next, ties
kept in the order given.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol, TypeVar


class Caused(Protocol):
    @property
    def event_id(self) -> str: ...

    @property
    def causation_id(self) -> str | None: ...

    @property
    def occurred_at(self) -> datetime: ...


E = TypeVar("E", bound=Caused)


def causal_order(events: Sequence[E]) -> list[E]:
    """``events`` (given oldest first, ties in a stable order) with every effect after its cause.

    An effect stamped before its cause comes right after the cause. Events the envelope would make a
    cycle of (which no component writes) cannot be ordered by cause: they keep their given order, at
    the end, rather than be dropped from the timeline."""
    ids = {e.event_id for e in events}
    effects: dict[str, list[int]] = {}
    ready: list[tuple[datetime, int]] = []
    for i, e in enumerate(events):
        if e.causation_id and e.causation_id in ids and e.causation_id != e.event_id:
            effects.setdefault(e.causation_id, []).append(i)
        else:
            ready.append((e.occurred_at, i))
    heapq.heapify(ready)
    ordered: list[E] = []
    listed: set[int] = set()
    while ready:
        _, i = heapq.heappop(ready)
        ordered.append(events[i])
        listed.add(i)
        for j in effects.pop(events[i].event_id, []):
            heapq.heappush(ready, (events[j].occurred_at, j))
    ordered.extend(e for i, e in enumerate(events) if i not in listed)
    return ordered
