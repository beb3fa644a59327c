"""Add a tool by deploying its consumer group: runs of a workflow that needs `crm` wait for it, then
`streamagent tool crm` is started into the running stack and they complete. No restart, nothing in
processors/ names the tool, and every step has one effect per run. The waits are durable: a decision
processor killed while runs wait finds them in its table when it comes back."""

from __future__ import annotations

import io
import tokenize
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from helpers import ended, eventually, read_topic
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import SandboxClient

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.kafka import admin, group_offsets
from streamagent.submit import produce_requests
from streamagent.topics import RUN_STATE

pytestmark = pytest.mark.integration

WORKFLOW = "onboarding-with-crm"
APIS = ["crm", "email", "enrich", "jira", "slack"]
PROCESSORS = Path(__file__).resolve().parents[2] / "processors"


def names_crm(path: Path) -> bool:
    """Does the code (a name or a string, not a comment) of ``path`` mention crm?"""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return any(t.type in (tokenize.NAME, tokenize.STRING) and "crm" in t.string.lower() for t in tokens)


def waiting_for_crm(s: Settings, run_ids: list[str]) -> list[queries.RunRow] | None:
    """The projected rows of ``run_ids`` once every one of them shows it waits for crm, else None."""
    rows = [r for r in queries.runs(s) if r.run_id in run_ids]
    ok = len(rows) == len(run_ids) and all(r.status == "running" and r.reason == "waiting for tool crm" for r in rows)
    return rows if ok else None


def assert_one_effect_per_step(s: Settings, run_ids: list[str]) -> None:
    effects = SandboxClient(s.sandbox_url).effects()
    for run_id in run_ids:
        mine = Counter(e.api for e in effects if e.run_id == run_id)
        assert sorted(mine) == APIS and set(mine.values()) == {1}, (run_id, mine)


def test_runs_waiting_for_crm_complete_once_the_crm_tool_is_deployed(settings: Settings) -> None:
    assert [p for p in PROCESSORS.rglob("*") if "crm" in p.name.lower() or (p.suffix == ".py" and names_crm(p))] == []
    requests = [r.model_copy(update={"workflow": WORKFLOW}) for r in sample_requests(3)]
    with Stack(settings, tools=("enrich", "jira", "draft", "email", "slack")) as stack:
        s = stack.settings
        run_ids = produce_requests(s, requests)

        rows = eventually(
            lambda: waiting_for_crm(s, run_ids), timeout=40, interval=0.2, what="the runs waiting for tool crm"
        )
        assert all(r.steps_done == 1 and r.workflow == "onboarding-with-crm" for r in rows)  # enrich done, crm next
        assert {e.api for e in SandboxClient(s.sandbox_url).effects()} == {"enrich"}
        started = {name: child.pid for name, child in stack.children.items()}

        stack.add_tool("crm")  # its own consumer group, into the running stack

        rows = eventually(lambda: ended(s, run_ids), timeout=40, interval=0.2, what="the runs ended")
        assert Counter(r.status for r in rows) == {"completed": len(run_ids)}, [(r.run_id, r.reason) for r in rows]
        assert all(r.steps_done == 6 for r in rows)
        # Nothing was restarted: the processors and the first tools are the processes they were.
        assert {n: c.pid for n, c in stack.children.items() if n in started} == started
        assert {n: c.restarts for n, c in stack.children.items() if c.restarts} == {}

        assert_one_effect_per_step(s, run_ids)
        effects = SandboxClient(s.sandbox_url).effects()
        accounts = [e for e in effects if e.api == "crm"]
        assert all(e.status == 201 and e.response["created"] is True for e in accounts)
        assert sorted(e.request["name"] for e in accounts) == sorted(r.company_name for r in requests)


def test_runs_waiting_for_crm_complete_after_the_decision_processor_is_killed_while_they_wait(
    settings: Settings,
) -> None:
    """kill -9 the decision processor while runs wait, after it committed every snapshot it decided:
    no snapshot of theirs comes again (a recorded wait asks the state processor for none), so only
    the restarted processor's ``decision_waits`` can tell it who waits. Then crm is deployed."""
    requests = [r.model_copy(update={"workflow": WORKFLOW}) for r in sample_requests(8)]
    with Stack(settings, tools=("enrich", "jira", "draft", "email", "slack")) as stack:
        s = stack.settings
        run_ids = produce_requests(s, requests)
        eventually(lambda: waiting_for_crm(s, run_ids), timeout=40, interval=0.2, what="the runs waiting for tool crm")
        with psycopg.connect(s.database_url) as conn:
            filed = conn.execute("SELECT run_id, tool FROM decision_waits").fetchall()
        assert sorted(filed) == sorted((run_id, "crm") for run_id in run_ids)

        # The decision group has committed past every snapshot on the state topic: nothing will be
        # redelivered to the restarted process (otherwise it would re-learn the waits from replays).
        state = s.topic(RUN_STATE)
        client = admin(s)

        def committed_to_the_end() -> dict[tuple[str, int], int] | None:
            ends: dict[tuple[str, int], int] = {}
            for message in read_topic(s, state):
                ends[(state, message.partition())] = message.offset() + 1
            committed = group_offsets(client, s.group("decision"), list(ends))
            return committed if all(committed.get(tp, -1) >= end for tp, end in ends.items()) else None

        eventually(committed_to_the_end, timeout=30, interval=0.2, what="the decision group committed every snapshot")

        old = stack.kill("processor-decision")
        decision = stack.children["processor-decision"]
        eventually(lambda: decision.pid not in (None, old) and decision.alive(), timeout=30, what="decision restarted")

        stack.add_tool("crm")

        rows = eventually(lambda: ended(s, run_ids), timeout=60, interval=0.2, what="the runs ended")
        assert Counter(r.status for r in rows) == {"completed": len(run_ids)}, [(r.run_id, r.reason) for r in rows]
        assert all(r.steps_done == 6 for r in rows)
        assert_one_effect_per_step(s, run_ids)
        with psycopg.connect(s.database_url) as conn:
            assert conn.execute("SELECT count(*) FROM decision_waits").fetchone() == (0,)
            # Woken once: each step of each run was dispatched by exactly one decision.
            twice = conn.execute(
                "SELECT run_id, step, count(*) FROM decisions WHERE action = 'dispatch'"
                " GROUP BY run_id, step HAVING count(*) <> 1"
            ).fetchall()
        assert twice == []
