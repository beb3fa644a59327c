"""Only the pipeline's own components change a run (streamagent.authn), on the real broker and PostgreSQL.

A producer that holds no key writes what issue 18 found it could: an approval, a success and a failure
result, a run's end, a decision, a lost-command alarm, an undo result, and events of runs that never
existed. Each is dead-lettered ``unauthenticated`` by the fold and by the projection, changes no state
(no snapshot was made on it), adds no row, and causes no effect; the held step stays held until a person
approves it with an operator key, and the real result, arriving after the forged ones, is the one used.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer
from helpers import ended, eventually, read_topic
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import SandboxClient

from streamagent import codec
from streamagent.config import Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack, local_operator
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import (
    ApprovalDenied,
    ApprovalGranted,
    CommandLost,
    DecisionAction,
    DecisionRecorded,
    Event,
    FailureStatus,
    RunFailed,
    RunRequested,
    ToolResult,
    ToolStatus,
    command_id,
    new_id,
)
from streamagent.submit import produce_requests
from streamagent.topics import RUN_EVENTS, RUN_REQUESTS, RUN_STATE, TOOL_RESULTS

pytestmark = pytest.mark.integration

# Mail to anyone outside ok.example waits for a person; Jira answers after 4 s, long enough to forge
# its result first.
POLICY = """
[[approvals.rules]]
tool = "email"
argument = "to"
not_matching = '@ok\\.example$'
reason = "email outside the allow-list"
"""
JIRA_LATENCY_MS = 4000


def _events(s: Settings, run_ids: list[str]) -> list[tuple[str, str, str, dict[str, Any]]]:
    with psycopg.connect(s.database_url) as conn:
        rows = conn.execute(
            "SELECT event_id, run_id, type, payload FROM run_events WHERE run_id = ANY(%s) ORDER BY occurred_at",
            (run_ids,),
        ).fetchall()
    return [(e, r, t, p) for e, r, t, p in rows]


def _effects(s: Settings, run_id: str) -> Counter[str]:
    return Counter(f"{e.api}.{e.op}" for e in SandboxClient(s.sandbox_url).effects(run_id=run_id))


def _forge(s: Settings, events: list[tuple[str, Event]]) -> None:
    """Produced as anyone who can write the topics could: the project's key, no header, no key held."""
    producer = Producer({"bootstrap.servers": s.bootstrap_servers, "partitioner": "murmur2_random"})
    for topic, event in events:
        producer.produce(s.topic(topic), key=event.run_id.encode(), value=codec.encode(event))
    assert producer.flush(10) == 0


def _refused(s: Settings, forged: set[str]) -> dict[str, set[str]] | None:
    """Per forged event id, which processors dead-lettered it ``unauthenticated`` (once both did)."""
    by_event: dict[str, set[str]] = {}
    for letter in read_dead_letters(s, reason="unauthenticated"):
        event = codec.decode(letter.value)
        if event.event_id in forged:  # type: ignore[attr-defined]
            by_event.setdefault(event.event_id, set()).add(letter.processor)  # type: ignore[attr-defined]
    done = set(by_event) == forged and all({"state", "projection"} <= p for p in by_event.values())
    return by_event if done else None


def _snapshot_causes(s: Settings, run_ids: set[str]) -> set[str]:
    """The event each published snapshot of these runs was made on (its last folded event)."""
    causes = set()
    for message in read_topic(s, s.topic(RUN_STATE)):
        snap = codec.decode(message.value())
        if snap.run_id in run_ids:  # type: ignore[attr-defined]
            causes.add(snap.last_event_id)  # type: ignore[attr-defined]
    return causes


def test_no_producer_without_a_key_can_approve_fake_a_result_or_end_a_run(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "allow-list.toml").write_text(POLICY)
    settings = settings.model_copy(update={"policies_dir": tmp_path / "policies"})
    with Stack(settings, sandbox_faults={"jira": {"latency_ms": JIRA_LATENCY_MS}}) as stack:
        s = stack.settings
        for key, value in to_env(s).items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        first, second = sample_requests(2)
        held_run = first.model_copy(update={"contact_email": "ceo@elsewhere.io"})  # its email waits for a person
        second = second.model_copy(update={"contact_email": "ada@ok.example"})  # on the allow-list
        produce_requests(s, [held_run, second])
        ghost = new_id()  # a run nobody requested

        # -- Jira is slow: forge its answer (success, failure, an undo) while the real call is under way --
        jira_id = command_id(second.run_id, "jira")
        eventually(
            lambda: any(t == "DecisionRecorded" and p["step"] == "jira" for _, _, t, p in _events(s, [second.run_id])),
            timeout=60,
            what="the jira step dispatched",
        )
        fake = {"key": "FORGED", "url": "https://evil.example/FORGED"}
        undo_id = command_id(second.run_id, "jira", "compensate")  # an undo nobody asked for
        results: list[tuple[str, Event]] = [
            (TOOL_RESULTS, ToolResult(run_id=second.run_id, command_id=jira_id, tool="jira", step="jira",
                                      status=ToolStatus.succeeded, output=fake)),
            (TOOL_RESULTS, ToolResult(run_id=second.run_id, command_id=jira_id, tool="jira", step="jira",
                                      status=ToolStatus.failed, error="forged", error_kind="permanent")),
            (TOOL_RESULTS, ToolResult(run_id=second.run_id, command_id=undo_id, tool="jira", step="jira",
                                      operation="compensate", status=ToolStatus.succeeded)),
        ]  # fmt: skip
        _forge(s, results)

        # -- the held email: forge its approval and denial, a decision, an end and a lost-command alarm --
        (asked,) = eventually(lambda: queries.approvals(s, run_id=held_run.run_id), timeout=60, what="email held")
        run_log: list[tuple[str, Event]] = [
            (RUN_EVENTS, ApprovalGranted(run_id=held_run.run_id, request_id=asked.request_id, step="email", by="ceo")),
            (RUN_EVENTS, ApprovalDenied(run_id=held_run.run_id, request_id=asked.request_id, step="email", by="ceo")),
            (RUN_EVENTS, DecisionRecorded(run_id=held_run.run_id, decision_id=new_id(), based_on_version=99,
                                          action=DecisionAction.dispatch, step="email", tool="email",
                                          command_id=command_id(held_run.run_id, "email"), reason="forged",
                                          decider="rules")),
            (RUN_EVENTS, RunFailed(run_id=held_run.run_id, decision_id=new_id(), status=FailureStatus.failed,
                                   reason="forged end")),
            (RUN_EVENTS, CommandLost(run_id=held_run.run_id, command_id=command_id(held_run.run_id, "jira"),
                                     step="jira", tool="jira", redrive=1, give_up=True, evidence="forged")),
            # Runs that never existed: a request straight onto the run log, and a result for a ghost.
            (RUN_EVENTS, RunRequested.model_validate({**first.model_dump(), "run_id": ghost, "event_id": new_id()})),
            (TOOL_RESULTS, ToolResult(run_id=ghost, command_id=command_id(ghost, "enrich"), tool="enrich",
                                      step="enrich", status=ToolStatus.succeeded)),
        ]  # fmt: skip
        _forge(s, run_log)
        forged = {e.event_id for _, e in [*results, *run_log]}
        refused = eventually(lambda: _refused(s, forged), timeout=60, interval=0.3, what="every forgery refused")
        assert set(refused) == forged
        # A request written straight onto the run log (an old producer) is told where requests go.
        (direct,) = [
            d
            for d in read_dead_letters(s, reason="unauthenticated")
            if d.processor == "state" and codec.decode(d.value).type == "RunRequested"  # type: ignore[attr-defined]
        ]
        assert s.topic(RUN_REQUESTS) in direct.error and "intake" in direct.error

        # The real Jira result, four seconds after the call, is the one the run uses.
        (done,) = eventually(lambda: ended(s, [second.run_id]), timeout=90, what="the slow run ended")
        assert done.status == "completed", done.reason
        timeline = _events(s, [second.run_id])
        (real,) = [p for _, _, t, p in timeline if t == "ToolResult" and p["step"] == "jira"]
        assert real["output"]["key"] != "FORGED"
        (mail,) = [p for _, _, t, p in timeline if t == "DecisionRecorded" and p["step"] == "email"]
        assert "FORGED" not in str(mail["arguments"]) and real["output"]["key"] in mail["arguments"]["body"]
        assert _effects(s, second.run_id) == Counter(
            {"enrich.find": 1, "jira.create": 1, "email.send": 1, "slack.post_message": 1}
        )

        # The held step is still held: no mail, the request still pending, the run still running.
        assert _effects(s, held_run.run_id) == Counter({"enrich.find": 1, "jira.create": 1})
        (still,) = queries.approvals(s, run_id=held_run.run_id)
        assert still.status == "requested"
        row = queries.run(s, held_run.run_id)
        assert row is not None and row.status == "running"

        # No forged event became a row, a timeline line, a run, or the basis of a snapshot.
        ids = {e for e, *_ in _events(s, [held_run.run_id, second.run_id, ghost])}
        assert not ids & forged
        assert queries.run(s, ghost) is None
        assert not _snapshot_causes(s, {held_run.run_id, second.run_id, ghost}) & forged

        # A person approves with the operator key `up` issued: recorded under that key's identity.
        assert cli(["approve", held_run.run_id[:8], "email"]) == 0  # the 8 characters the page shows
        (row,) = eventually(lambda: ended(s, [held_run.run_id]), timeout=60, what="the approved run ended")
        assert row.status == "completed", row.reason
        (answer,) = [a for a in queries.approvals(s, pending=False, run_id=held_run.run_id)]
        assert answer.status == "granted" and answer.decided_by == local_operator()
        assert _effects(s, held_run.run_id)["email.send"] == 1
        assert {n: c.restarts for n, c in stack.children.items() if c.restarts} == {}
