"""A run's timeline in causal order: a decision before the command it caused, even when the command's
millisecond is the same or the earlier one (the decision processor stamps the command first), and even
when the command was projected first (it travels on its tool's topic, the decision on the run's log)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from psycopg.types.json import Jsonb
from streamagent.processors.projection import queries
from streamagent.processors.projection.causal import causal_order
from streamagent.processors.projection.queries import TimelineEntry
from streamagent.processors.projection.schema import SCHEMA

from streamagent import db
from streamagent.config import Settings

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


def entry(event_id: str, ms: int, type_: str, cause: str | None) -> TimelineEntry:
    return TimelineEntry(
        occurred_at=T0 + timedelta(milliseconds=ms),
        type=type_,
        step=None,
        summary=type_,
        event_id=event_id,
        causation_id=cause,
        payload={},
    )


def _ids(entries: list[TimelineEntry]) -> list[str]:
    return [e.event_id for e in entries]


# What the page and `show` listed before: by time, the command first when the two tie (or when the
# command's millisecond is the earlier one).
AS_STORED = [
    entry("request", 0, "RunRequested", None),
    entry("command-1", 5, "ToolCommand", "decision-1"),
    entry("decision-1", 5, "DecisionRecorded", "request"),
    entry("command-2", 9, "ToolCommand", "decision-2"),  # a millisecond before its own decision
    entry("result-1", 9, "ToolResult", "command-1"),
    entry("decision-2", 10, "DecisionRecorded", "result-1"),
    entry("result-2", 12, "ToolResult", "command-2"),
]


def test_a_cause_is_listed_before_its_effects_whatever_their_timestamps() -> None:
    assert _ids(causal_order(AS_STORED)) == [
        "request",
        "decision-1",
        "command-1",
        "result-1",
        "decision-2",
        "command-2",
        "result-2",
    ]


def test_unrelated_events_keep_their_time_order_and_nothing_is_dropped() -> None:
    events = [
        entry("b", 0, "RunRequested", None),
        entry("a", 0, "Unrelated", "not-in-this-run"),  # a cause outside the timeline: ordered by time
        entry("x", 3, "Loop", "y"),  # a cycle no component writes: kept, at the end, in the given order
        entry("y", 4, "Loop", "x"),
        entry("c", 2, "DecisionRecorded", "b"),
    ]
    assert _ids(causal_order(events)) == ["b", "a", "c", "x", "y"]
    assert causal_order([]) == []


def test_the_timeline_query_of_show_and_the_page_is_causal(settings: Settings) -> None:
    db.migrate(settings, SCHEMA)
    with db.connect(settings) as conn:
        # Projected in the order a consumer of several topics may see them: the command first.
        for order, e in enumerate(reversed(AS_STORED)):
            conn.execute(
                "INSERT INTO run_events (event_id, run_id, type, occurred_at, causation_id, summary, payload,"
                " topic, kafka_partition, kafka_offset, recorded_at) VALUES (%s, 'r1', %s, %s, %s, %s, %s, 't', 0,"
                " %s, %s)",
                (e.event_id, e.type, e.occurred_at, e.causation_id, e.summary, Jsonb({}), order, T0),
            )
    assert _ids(queries.timeline(settings, "r1")) == _ids(causal_order(AS_STORED))
