"""The page's endpoints on a real PostgreSQL, over HTTP: the runs list pages like ``git log`` (``before``
a run, newest first, with the cursor of the next page), and the approvals endpoint lists each held step
with what it would do, the rule that held it, its age and expiry, and the commands that answer it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg.types.json import Jsonb
from streamagent.processors.projection.queries import ApprovalRow
from streamagent.processors.projection.schema import SCHEMA

from streamagent import db
from streamagent.config import Settings
from streamagent.console.ui import UiServer
from streamagent.console.ui.approvals import approvals_view

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
# Seven runs a minute apart, and two requested in the same instant (the tie a cursor must not lose).
RUNS = [(f"run-{i}", T0 + timedelta(minutes=i)) for i in range(7)] + [("tie-at-a", T0), ("tie-at-b", T0)]


@pytest.fixture
def api(settings: Settings) -> Iterator[str]:
    db.migrate(settings, SCHEMA)
    with db.connect(settings) as conn:
        for run_id, at in RUNS:
            conn.execute(
                "INSERT INTO runs (run_id, company_name, status, created_at, workflow) VALUES (%s, 'Acme', %s, %s,"
                " 'onboarding')",
                (run_id, "completed" if run_id != "run-3" else "running", at),
            )
    server = UiServer(settings, "127.0.0.1", 0).start()
    yield server.url + "/api"
    server.shutdown()
    server.server_close()


def _page(api: str, **params: Any) -> dict[str, Any]:
    answer = httpx.get(f"{api}/runs", params=params, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_the_runs_list_pages_newest_first_by_cursor(api: str) -> None:
    seen: list[str] = []
    before = None
    for _ in range(10):  # nine runs, pages of four: three pages, the last one short
        page = _page(api, limit=4, **({"before": before} if before else {}))
        seen += [r["run_id"] for r in page["runs"]]
        before = page["next_before"]
        if before is None:
            break
        assert before == seen[-1]  # the cursor is the last run shown
    # Every run once, newest first; the tie broken by run id, as `streamagent runs --before` does.
    assert seen == ["run-6", "run-5", "run-4", "run-3", "run-2", "run-1", "tie-at-b", "tie-at-a", "run-0"]
    # The cursor goes with the filters, and a prefix that the CLI would take works too.
    assert [r["run_id"] for r in _page(api, before="run-5", status="completed", limit=2)["runs"]] == ["run-4", "run-2"]
    assert _page(api, before="tie-at-b", limit=5)["next_before"] is None
    for bad in ("no-such-run", "tie-at"):  # unknown, and a prefix of several runs: said, not an empty page
        answer = httpx.get(f"{api}/runs", params={"before": bad}, timeout=10)
        assert answer.status_code == 400 and answer.json()["error"].startswith("before: ")


def _ask(settings: Settings, request_id: str, run_id: str, minutes_ago: int, expires_in_s: int, **args: Any) -> None:
    at = datetime.now(UTC)
    with db.connect(settings) as conn:
        conn.execute(
            "INSERT INTO approvals (request_id, run_id, step, tool, arguments, reason, policy_version, status,"
            " requested_at, expires_at) VALUES (%s, %s, 'email', 'email', %s, 'email outside the allow-list',"
            " 'p1', 'requested', %s, %s)",
            (
                request_id,
                run_id,
                Jsonb(args),
                at - timedelta(minutes=minutes_ago),
                at + timedelta(seconds=expires_in_s),
            ),
        )


def test_the_approvals_endpoint_says_what_waits_why_and_how_to_answer(api: str, settings: Settings) -> None:
    assert httpx.get(f"{api}/approvals", timeout=10).json()["approvals"] == []
    _ask(settings, "q1", "run-3", 12, 3600, to="ada@acme.io", subject="Welcome to Acme", body="…", cc="x@y.z")
    _ask(settings, "q2", "run-5", 1, -5, to="bob@acme.io", subject="Hi")  # past its expiry, not yet expired
    with db.connect(settings) as conn:  # answered: no longer waiting
        conn.execute(
            "INSERT INTO approvals (request_id, run_id, step, tool, arguments, reason, policy_version, status,"
            " requested_at, expires_at) VALUES ('q0', 'run-1', 'email', 'email', '{}', 'r', 'p1', 'granted',"
            " now(), now())"
        )
    body = httpx.get(f"{api}/approvals", timeout=10).json()
    assert body["waiting_runs"] == 2
    first, second = body["approvals"]  # the longest wait first
    assert (first["run_id"], first["run_short"], first["workflow"], first["step"], first["tool"]) == (
        "run-3",
        "run-3",
        "onboarding",
        "email",
        "email",
    )
    assert first["what"] == "to=ada@acme.io subject=Welcome to Acme"  # as `streamagent approvals` prints it
    assert first["reason"] == "email outside the allow-list" and first["arguments"]["cc"] == "x@y.z"
    assert first["age"] == "12m" and first["expires_in"] in ("59m", "1h")
    assert first["approve"] == "streamagent approve run-3 email"
    assert first["deny"] == "streamagent deny run-3 email --note WHY"
    assert second["expires_in"] is None  # overdue: the timer expires it next


def test_approval_commands_are_quoted_for_a_shell() -> None:
    row = ApprovalRow(
        request_id="q",
        run_id="0123456789abcdef",
        step="send mail",
        tool="email",
        arguments={},
        reason="r",
        policy_version="p",
        status="requested",
        requested_at=T0,
        expires_at=T0 + timedelta(hours=1),
        decided_by=None,
        note=None,
        decided_at=None,
    )
    (held,) = approvals_view([row], {}, T0)["approvals"]
    assert held["approve"] == "streamagent approve 0123456789abcdef 'send mail'"
    assert held["run_short"] == "01234567" and held["workflow"] is None and held["what"] == "(no arguments)"
