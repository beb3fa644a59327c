"""`streamagent report --json` on the real broker and PostgreSQL: ten runs, some failing, some
escalating (one refused by the guard), one held for a person's approval, and the report's figures are
those of the runs the test made; Prometheus says the same."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import ended, eventually
from streamagent.processors.projection import queries

from streamagent.config import Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.events import now
from streamagent.metrics import scrape
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

STEPS = 5  # workflows/onboarding.toml
# The sandbox answers the first two enrich calls 503. Which runs they hit is not the test's to choose: a
# call of a run that ends early (the late run's deadline, the stale run's budget) may not be retried, so
# the retries the report must count are those its results record, at most two.
ENRICH_FAULTS = 2
# Every enrich call takes this long: a run whose deadline has passed at its request is escalated by the
# state processor's timer (every 0.5 s) before its first step can finish, so it never completes instead.
ENRICH_LATENCY_MS = 1000
# The policy in force: a run older than this is refused its next command by the guard (and escalates),
# and mail to an "approve-me" mailbox waits for a person.
WALL_TIME_S = 45
POLICY = f"""
[workflows.onboarding.budgets]
max_wall_time_s = {WALL_TIME_S}

[[approvals.rules]]
tool = "email"
argument = "to"
matching = '^approve-me@'
reason = "mail to this mailbox needs a person"
"""


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Settings]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "quality.toml").write_text(POLICY)
    settings = settings.model_copy(update={"policies_dir": tmp_path / "policies"})
    for key, value in to_env(settings).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def _events(s: Settings, run_ids: list[str]) -> list[tuple[str, str, dict[str, Any], Any]]:
    with psycopg.connect(s.database_url) as conn:
        rows = conn.execute(
            "SELECT run_id, type, payload, occurred_at FROM run_events WHERE run_id = ANY(%s) ORDER BY occurred_at",
            (run_ids,),
        ).fetchall()
    return [(r, t, p, at) for r, t, p, at in rows]


def _settled(s: Settings, run_ids: list[str]) -> list[tuple[str, str, dict[str, Any], Any]] | None:
    """The runs' events once every run has ended and every command it sent has its result projected
    (an undo after an escalation, or a result on its own topic, may be copied after the run's end)."""
    if not ended(s, run_ids):
        return None
    events = _events(s, run_ids)
    sent = {p["command_id"] for _, t, p, _ in events if t == "DecisionRecorded" and p["command_id"]}
    answered = {p["command_id"] for _, t, p, _ in events if t == "ToolResult"}
    return events if sent <= answered else None


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert cli(["report", "--json", *args]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_report_json_figures_match_the_runs_made(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    faults = {"enrich": {"fail_next": ENRICH_FAULTS, "latency_ms": ENRICH_LATENCY_MS}}
    with Stack(env, sandbox_faults=faults) as stack:
        s = stack.settings
        made = sample_requests(10)
        plain = made[:4]
        # Mail to this contact waits for a person; the test approves it (CLI) as soon as it is asked.
        approved = made[4].model_copy(update={"contact_email": f"approve-me@{made[4].company_domain}"})
        completes = [*plain, approved]
        # The sandbox refuses a "bounce" mailbox for good: the email step fails, so does the run.
        bounces = [r.model_copy(update={"contact_email": f"bounce@{r.company_domain}"}) for r in made[5:7]]
        # RFC 2606 .invalid: the enrichment API answers 404, a permanent error of the first step.
        unknown = [made[7].model_copy(update={"company_domain": "no-such-company.invalid"})]
        # Requested 5 s ago with a 1 s deadline: the deadline timer escalates it while enrich works.
        late = made[8].model_copy(update={"deadline_s": 1.0, "occurred_at": now() - timedelta(seconds=5)})
        # Requested two wall-time budgets ago: the guard refuses its first command, the run escalates.
        stale = made[9].model_copy(update={"occurred_at": now() - timedelta(seconds=2 * WALL_TIME_S)})
        requests = [*completes, *bounces, *unknown, late, stale]
        run_ids = produce_requests(s, requests)
        (held,) = eventually(lambda: queries.approvals(s, run_id=approved.run_id), timeout=60, what="approval asked")
        assert cli(["approve", approved.run_id, held.step]) == 0  # signed with the operator key `up` issued
        events = eventually(lambda: _settled(s, run_ids), timeout=90, what="runs ended, every command answered")

        expected_status = {
            **{r.run_id: "completed" for r in completes},
            **{r.run_id: "failed" for r in [*bounces, *unknown]},
            late.run_id: "escalated",
            stale.run_id: "escalated",
        }
        report = _report(capsys, "--per-run")
        assert {r["run_id"]: r["status"] for r in report["runs"]} == expected_status
        total = report["total"]
        assert (total["runs"], total["completed"], total["failed"], total["escalated"], total["running"]) == (
            10,
            5,
            3,
            2,
            0,
        )
        assert total["success_rate"] == 0.5
        reasons = {(r["status"], r["step"], r["runs"]): r["reason"] for r in report["failure_reasons"]}
        assert report["failure_reasons"][0]["runs"] == 2 and len(reasons) == 4
        assert "recipient rejected" in reasons["failed", "email", 2]
        assert "company not found" in reasons["failed", "enrich", 1]
        assert "deadline <time> passed" in reasons["escalated", None, 1]
        (refusal,) = [r for (status, _, _), r in reasons.items() if status == "escalated" and r.startswith("guard:")]
        assert "max_wall_time_s=<n> exceeded" in refusal

        # Counted by the test from the projected event log, independently of the report's SQL.
        decisions = [(r, p) for r, t, p, _ in events if t == "DecisionRecorded"]
        results = [p for _, t, p, _ in events if t == "ToolResult"]
        assert total["decisions"] == len(decisions)
        assert total["tool_calls"] == sum(p["action"] in ("dispatch", "compensate") for _, p in decisions)
        assert total["min_tool_calls"] == 10 * STEPS
        # A run that ends early dispatches fewer commands than its workflow's steps: no excess here.
        assert total["excess_tool_calls"] == 0
        retried = sum(p["attempts"] - 1 for p in results)
        assert retried <= ENRICH_FAULTS
        assert total["retries"] == retried
        assert total["tool_attempts"] == sum(p["attempts"] for p in results)
        per_run_calls = Counter(r for r, p in decisions if p["action"] in ("dispatch", "compensate"))
        assert {r["run_id"]: r["tool_calls"] for r in report["runs"]} == {i: per_run_calls[i] for i in run_ids}
        assert {r["run_id"]: r["tool_calls"] for r in report["runs"] if r["status"] == "completed"} == {
            r.run_id: STEPS for r in completes
        }

        start = {r: at for r, t, _, at in events if t == "RunRequested"}
        end = {r: at for r, t, _, at in events if t in ("RunCompleted", "RunFailed")}
        durations = sorted((end[r] - start[r]).total_seconds() for r in run_ids)
        cuts = statistics.quantiles(durations, n=100, method="inclusive")
        assert total["duration_p50_s"] == pytest.approx(cuts[49])
        assert total["duration_p95_s"] == pytest.approx(cuts[94])
        assert total["duration_max_s"] == pytest.approx(durations[-1]) and durations[-1] >= 2 * WALL_TIME_S
        # The rules decide for free.
        assert (total["cost_usd"], total["cost_per_completed_usd"], total["prompt_tokens"]) == (0, 0, 0)
        # One refusal (the stale run), one approval, which waited from its request to the grant.
        asked = {p["request_id"]: at for _, t, p, at in events if t == "ApprovalRequested"}
        (wait,) = [(at - asked[p["request_id"]]).total_seconds() for _, t, p, at in events if t == "ApprovalGranted"]
        assert (total["guard_refusals"], total["approvals"]) == (1, 1)
        assert total["approval_wait_p50_s"] == total["approval_wait_p95_s"] == pytest.approx(wait)
        quality = {r["run_id"]: r for r in report["runs"]}
        assert (quality[stale.run_id]["guard_refusals"], quality[stale.run_id]["tool_calls"]) == (1, 0)
        assert (quality[approved.run_id]["approvals"], quality[approved.run_id]["tool_calls"]) == (1, STEPS)

        # One workflow, one group: --workflow gives the same figures, a workflow nobody knows is refused.
        assert report["workflows"] == {"onboarding": total}
        assert _report(capsys, "--workflow", "onboarding", "--since", "30m")["total"] == total
        assert _report(capsys, "--since", "all")["total"] == total
        assert cli(["report", "--workflow", "no-such-workflow"]) == 2
        assert "unknown workflow 'no-such-workflow'" in capsys.readouterr().err
        assert cli(["report"]) == 0
        table = capsys.readouterr().out
        assert "onboarding" in table and "50.0%" in table and "Top failure reasons:" in table

        # The projection process counted each run once, by workflow and status.
        port = int((s.data_dir / "metrics" / "processor-projection.port").read_text())
        for status, count in Counter(expected_status.values()).items():
            labels = {"workflow": "onboarding", "status": status}
            assert scrape(port, "streamagent_run_outcomes_total", labels) == count
            assert scrape(port, "streamagent_run_duration_seconds_count", labels) == count
        # Undos and results copied after a run's end are added as they come: the counters match the report.
        onboarding = {"workflow": "onboarding"}
        assert scrape(port, "streamagent_run_tool_calls_total", onboarding) == total["tool_calls"]
        assert scrape(port, "streamagent_run_retries_total", onboarding) == retried
        assert scrape(port, "streamagent_guard_refusals_total", onboarding) == 1
        assert scrape(port, "streamagent_approval_wait_seconds_count", onboarding) == 1
