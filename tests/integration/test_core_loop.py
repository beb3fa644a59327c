"""The core loop under load keeps to one pass per step: one snapshot and one decision per step, no
re-drive of work that is merely queued, and a bounded, backed-off re-drive of work that is truly lost.

Every process is a separate OS process on the real embedded broker and PostgreSQL.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from datetime import datetime

import psycopg
import pytest
from helpers import ended, eventually, read_topic, skip_to_end
from streamagent.tools.jira import Jira
from streamagent.tools.sandbox import SandboxClient

from streamagent import codec
from streamagent.catalogue import now_ms
from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.events import StateSnapshot, ToolCommand
from streamagent.kafka import producer as make_producer
from streamagent.submit import produce_requests
from streamagent.topics import RUN_STATE, TOOL_REGISTRY, command_topic

pytestmark = pytest.mark.integration

STEPS = 5


def _events_of(settings: Settings, run_ids: list[str], types: tuple[str, ...]) -> list[tuple[str, str, dict, datetime]]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT run_id, type, payload, occurred_at FROM run_events WHERE run_id = ANY(%s) AND type = ANY(%s)"
            " ORDER BY occurred_at",
            (run_ids, list(types)),
        ).fetchall()
    return [(r, t, p, at) for r, t, p, at in rows]


def _commands(settings: Settings, tool: str) -> Counter[str]:
    """How many times each command id was produced onto a tool's topic."""
    decoded = [codec.decode(m.value()) for m in read_topic(settings, settings.topic(command_topic(tool)))]
    return Counter(c.command_id for c in decoded if isinstance(c, ToolCommand))


def test_one_step_is_one_snapshot_and_one_decision(settings: Settings) -> None:
    with Stack(settings) as stack:
        s = stack.settings
        run_ids = produce_requests(s, sample_requests(5))
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="runs ended")
        assert Counter(r.status for r in rows) == {"completed": 5}
        snapshots = [codec.decode(m.value()) for m in read_topic(s, s.topic(RUN_STATE))]
        per_run = Counter(snap.run_id for snap in snapshots if isinstance(snap, StateSnapshot))
        # One snapshot per step, plus the one the request causes (its decision completes the run).
        assert per_run == {run_id: STEPS + 1 for run_id in run_ids}
        decisions = Counter(r for r, *_ in _events_of(s, run_ids, ("DecisionRecorded",)))
        assert decisions == {run_id: STEPS + 1 for run_id in run_ids}
        with psycopg.connect(s.database_url) as conn:
            stored = conn.execute("SELECT count(*) FROM decisions WHERE run_id = ANY(%s)", (run_ids,)).fetchone()
        assert stored is not None and stored[0] == len(run_ids) * (STEPS + 1)
        for tool in ("enrich", "jira", "draft", "email", "slack"):
            assert set(_commands(s, tool).values()) == {1}, f"a {tool} command was sent twice"


def test_a_command_waiting_behind_a_slow_tool_is_never_redriven(settings: Settings) -> None:
    # Loss checks every 0.3 s, while jira takes 0.6 s a call and works on one command at a time: most
    # jira commands wait seconds in their topic, and each is looked at several times meanwhile.
    settings = settings.model_copy(update={"redrive_check_s": 0.3, "redrive_check_max_s": 0.6, "tool_max_in_flight": 1})
    with Stack(settings, sandbox_faults={"jira": {"latency_ms": 600}}) as stack:
        s = stack.settings
        run_ids = produce_requests(s, sample_requests(6))
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="runs ended")
        assert Counter(r.status for r in rows) == {"completed": 6}
        assert _events_of(s, run_ids, ("CommandLost", "CommandResent")) == []
        jira = _commands(s, "jira")
        assert len(jira) == 6 and set(jira.values()) == {1}
        assert SandboxClient(s.sandbox_url).stats()["jira"]["requests"] >= 6


def test_a_lost_command_is_redriven_with_backoff_and_given_up_after_the_bound(settings: Settings) -> None:
    settings = settings.model_copy(update={"redrive_check_s": 0.5, "redrive_max": 2})
    # No jira tool: a black hole in the jira tool's group consumes every jira command and answers none.
    with Stack(settings, tools=("enrich", "email", "slack")) as stack:
        s = stack.settings
        # The black hole passes for a live jira tool in the catalogue, so the run is dispatched to it.
        hole = Jira.declaration(member_id="black-hole", at_ms=now_ms(), started_at_ms=now_ms(), lease_ms=600_000)
        registry = make_producer(s)
        registry.produce(s.topic(TOOL_REGISTRY), key=hole.key(), value=hole.encode())
        assert registry.flush(10) == 0
        (run_id,) = produce_requests(s, sample_requests(1))
        done = threading.Event()

        def black_hole() -> None:
            while not done.wait(0.2):
                skip_to_end(s, s.topic(command_topic("jira")), "tool.jira")

        thread = threading.Thread(target=black_hole, daemon=True)
        thread.start()
        try:
            (row,) = eventually(lambda: ended(s, [run_id]), timeout=120, what="run ended")
        finally:
            done.set()
            thread.join(10)
        assert (row.status, row.failed_step) == ("failed", "jira")
        assert row.reason is not None and "lost" in row.reason
        lost = [(p, at) for _, t, p, at in _events_of(s, [run_id], ("CommandLost",))]
        assert [(p["redrive"], p["give_up"]) for p, _ in lost] == [(1, False), (2, False), (3, True)]
        resent = _events_of(s, [run_id], ("CommandResent",))
        assert [p["redrive"] for _, _, p, _ in resent] == [1, 2]
        # The command and its two re-sends; nothing else was produced for it.
        assert list(_commands(s, "jira").values()) == [3]
        # Backoff: each re-drive waited longer than the one before.
        gaps = [(b - a).total_seconds() for (_, a), (_, b) in itertools.pairwise(lost)]
        assert gaps == sorted(gaps) and gaps[0] < gaps[-1]


def test_runs_beyond_the_bound_wait_in_order_and_all_complete(settings: Settings) -> None:
    # One run in flight per partition (4 partitions): the others wait, folded and durable, and are
    # admitted one after another as runs end.
    settings = settings.model_copy(update={"max_running_runs": settings.partitions})
    with Stack(settings) as stack:
        s = stack.settings
        run_ids = produce_requests(s, sample_requests(12))
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="runs ended")
        assert Counter(r.status for r in rows) == {"completed": 12}
        with psycopg.connect(s.database_url) as conn:
            spans = conn.execute(
                "SELECT e.kafka_partition, d.run_id, min(d.created_at), max(d.created_at)"
                " FROM decisions d JOIN run_events e ON e.run_id = d.run_id AND e.type = 'RunRequested'"
                " WHERE d.run_id = ANY(%s) GROUP BY e.kafka_partition, d.run_id ORDER BY 1, 3",
                (run_ids,),
            ).fetchall()
        by_partition: dict[int, list[tuple[datetime, datetime]]] = {}
        for partition, _run, first, last in spans:
            by_partition.setdefault(partition, []).append((first, last))
        # Within a partition, a run's first decision comes after the previous run's last one.
        for partition, runs in by_partition.items():
            for (_, end), (start, _) in itertools.pairwise(runs):
                assert start >= end, f"partition {partition} had two runs in flight at once"
        assert max(len(runs) for runs in by_partition.values()) > 1  # the bound was actually hit
