"""The run timeline page's JSON, built from rows without a database, and its server's read-only edge."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from streamagent.processors.projection.queries import RunRow, TimelineEntry

from streamagent.config import Settings
from streamagent.console.ui import UiServer
from streamagent.console.ui.api import ApiError, parse_runs_query, run_view, runs_view

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


def row(status: str = "running", **fields: Any) -> RunRow:
    values: dict[str, Any] = {
        "run_id": "r1",
        "company_name": "Acme",
        "workflow": "onboarding",
        "status": status,
        "steps_done": 1,
        "failed_step": None,
        "reason": None,
        "created_at": T0,
        "ended_at": None,
    }
    return RunRow.model_validate({**values, **fields})


def entry(ms: int, type_: str, step: str | None = None, **payload: Any) -> TimelineEntry:
    return TimelineEntry(
        occurred_at=T0 + timedelta(milliseconds=ms),
        type=type_,
        step=step,
        summary=f"{type_} {step or ''}".strip(),
        event_id=f"e{ms}",
        causation_id=None,
        payload=payload,
    )


def test_the_filters_are_validated_and_an_empty_box_means_no_filter() -> None:
    assert parse_runs_query({"status": "", "q": "", "before": ""}).model_dump() == {
        "status": None,
        "q": None,
        "limit": 200,
        "before": None,
    }
    assert parse_runs_query({"status": "failed", "q": "acme", "limit": "5"}).status == "failed"
    for bad in ({"status": "sleeping"}, {"limit": "0"}, {"limit": "many"}, {"order": "asc"}):
        with pytest.raises(ApiError) as caught:
            parse_runs_query(bad)
        assert caught.value.status == 400 and next(iter(bad)) in str(caught.value)


def test_runs_carry_their_step_total_and_every_status_is_counted() -> None:
    view = runs_view([row(steps_done=2)], {"completed": 3, "paused": 1}, {"onboarding": 4})
    assert view["runs"][0]["steps_total"] == 4 and view["runs"][0]["steps_done"] == 2
    # the five known statuses always (zero or not), then any other the table holds
    assert view["counts"] == {
        "running": 0,
        "completed": 3,
        "failed": 0,
        "escalated": 0,
        "cancelled": 0,
        "paused": 1,
    }


def test_a_timeline_shows_steps_decisions_and_any_event_type_generically() -> None:
    context = {
        "messages": [{"role": "system", "content": "You onboard clients."}, {"role": "user", "content": "state"}],
        "answer": {"tool": "enrich"},
        "plan": "enrich first",
    }
    entries = [
        entry(0, "RunRequested"),
        entry(5, "DecisionRecorded", "enrich", decider="llm", prompt_tokens=40, completion_tokens=7, context=context),
        entry(6, "ToolCommand", "enrich", tool="enrich"),
        entry(120, "ToolResult", "enrich", tool="enrich", status="succeeded", attempts=2, duration_ms=98),
        entry(121, "ToolCommand", "jira", tool="jira"),
        entry(122, "ToolCommand", "enrich", tool="enrich", operation="compensate"),  # an undo keeps the outcome
        entry(130, "ApprovalRequested", "email", approver="ops"),  # a gate on a step: named, not imported
        entry(140, "BudgetChecked", "slack", spent=0.4),  # a type this code has never heard of
    ]
    view = run_view(row(), entries, {"onboarding": 4}, ["enrich", "jira", "email", "slack"])

    assert [(s["name"], s["status"], s["attempts"], s["undo"]) for s in view["steps"]] == [
        ("enrich", "succeeded", 2, "compensate running"),
        ("jira", "running", None, None),
        ("email", "awaiting approval", None, None),
        ("slack", "pending", None, None),
    ]
    timeline = view["timeline"]
    assert [e["offset_ms"] for e in timeline] == [0, 5, 6, 120, 121, 122, 130, 140]
    decision = timeline[1]["decision"]
    assert decision["by_model"] and (decision["prompt_tokens"], decision["completion_tokens"]) == (40, 7)
    assert [m["role"] for m in decision["messages"]] == ["system", "user"]
    assert decision["answers"] == ['{"tool": "enrich"}'] and decision["other"] == {"plan": "enrich first"}
    unknown = timeline[-1]
    assert unknown["type"] == "BudgetChecked" and unknown["payload"] == {"spent": 0.4}
    assert unknown["summary"] == "BudgetChecked slack" and unknown["step"] == "slack"
    assert decision["guard"] is None  # a decision written before the guard existed


def test_a_decision_shows_the_guards_verdict_and_an_approved_step_runs() -> None:
    entries = [
        entry(0, "RunRequested"),
        entry(
            5,
            "DecisionRecorded",
            "email",
            decider="rules",
            guard_outcome="approval",
            guard_reason="mail to a new domain",
            policy_version="p7",
        ),
        entry(6, "ApprovalRequested", "email"),
        entry(9, "ApprovalGranted", "email", by="ops"),
        entry(10, "ToolCommand", "email", tool="email"),
    ]
    view = run_view(row(), entries, {}, ["email"])
    assert view["timeline"][1]["decision"]["guard"] == {
        "outcome": "approval",
        "reason": "mail to a new domain",
        "policy_version": "p7",
    }
    assert view["steps"][0]["status"] == "running"
    denied = run_view(row(), [*entries[:3], entry(9, "ApprovalDenied", "email", by="ops")], {}, ["email"])
    assert denied["steps"][0]["status"] == "denied"


def test_a_step_card_tells_the_steps_span_not_the_last_executions() -> None:
    # "8 attempt(s) · 31 ms" for a step that took 39 s: the tool restarted during the outage, claimed the
    # command afresh (its ledger counts every try, 8) and timed only its own last execution (31 ms).
    entries = [
        entry(0, "RunRequested"),
        entry(5, "DecisionRecorded", "slack"),
        entry(6, "ToolCommand", "slack", tool="slack"),
        entry(20_006, "CommandResent", "slack", tool="slack", redrive=1),  # thought lost, sent again
        entry(39_006, "ToolResult", "slack", tool="slack", status="succeeded", attempts=8, duration_ms=31),
    ]
    (slack,) = run_view(row(), entries, {}, ["slack"])["steps"]
    assert (slack["status"], slack["attempts"], slack["sent"]) == ("succeeded", 8, 2)
    assert slack["duration_ms"] == 39_000 and slack["last_call_ms"] == 31
    assert slack["started_at"] == (T0 + timedelta(milliseconds=6)).isoformat()
    # While it runs: since when, and no figures yet; an undo's result changes none of them.
    running = run_view(row(), entries[:4], {}, ["slack"])["steps"][0]
    assert (running["status"], running["attempts"], running["duration_ms"], running["sent"]) == (
        "running",
        None,
        None,
        2,
    )
    undone = run_view(
        row(),
        [*entries, entry(40_000, "ToolResult", "slack", status="succeeded", operation="compensate", duration_ms=5)],
        {},
        ["slack"],
    )["steps"][0]
    assert (undone["duration_ms"], undone["undo"]) == (39_000, "compensate succeeded")


@pytest.fixture
def server() -> Iterator[UiServer]:
    server = UiServer(Settings(), "127.0.0.1", 0).start()  # no database: only what needs none is asked
    yield server
    server.shutdown()
    server.server_close()


def test_the_server_serves_the_page_and_only_reads(server: UiServer) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/app.js"' in page.text and "http" not in page.text.replace('href="/', "")  # nothing from elsewhere
    assert httpx.get(server.url + "/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/api/health").json() == {"ok": True}
    assert httpx.get(server.url + "/api/config").json() == {"poll_s": 1.0, "page_size": 50}
    assert httpx.get(server.url + "/static/../../pyproject.toml").status_code == 404
    assert httpx.get(server.url + "/api/runs?status=sleeping").status_code == 400
    for method in ("POST", "PUT", "DELETE"):
        answer = httpx.request(method, server.url + "/api/runs")
        assert answer.status_code == 405 and answer.headers["allow"] == "GET, HEAD"


def test_a_database_that_cannot_be_reached_is_a_503_saying_so() -> None:
    settings = Settings(database_url="postgresql://app:secret@127.0.0.1:1/app")  # nobody listens on port 1
    server = UiServer(settings, "127.0.0.1", 0).start()
    try:
        answer = httpx.get(server.url + "/api/runs", timeout=10)
        assert answer.status_code == 503
        assert answer.json()["error"].startswith("PostgreSQL: ") and "secret" not in answer.text
        assert httpx.get(server.url + "/api/health").json() == {"ok": True}  # the server itself carries on
    finally:
        server.shutdown()
        server.server_close()


def test_the_run_page_links_a_child_to_its_parent_and_a_parent_to_its_children() -> None:
    child = row("completed", run_id="c1", workflow="kyc-check", parent_run_id="r1", parent_step="kyc")
    view = run_view(row(), [entry(0, "RunRequested")], {"kyc-check": 2}, ["enrich", "kyc"], [child])
    (shown,) = view["children"]
    assert (shown["run_id"], shown["parent_step"], shown["status"], shown["steps_total"]) == (
        "c1",
        "kyc",
        "completed",
        2,
    )
    own = run_view(child, [], {}, [])
    assert (own["run"]["parent_run_id"], own["run"]["parent_step"], own["children"]) == ("r1", "kyc", [])
