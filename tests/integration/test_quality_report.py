"""`streamagent report --json` on the real broker and PostgreSQL: ten runs, some failing and some
escalating, and the report's figures are those of the runs the test made; Prometheus says the same."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from helpers import ended, eventually

from streamagent.config import Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.demo import sample_requests
from streamagent.console.stack import Stack
from streamagent.events import now
from streamagent.metrics import scrape
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

STEPS = 4  # workflows/onboarding.toml
ENRICH_FAULTS = 2  # the sandbox answers the first two enrich calls 503: two retries, whichever runs they hit
# Every enrich call takes this long: a run whose deadline has passed at its request is escalated by the
# state processor's timer (every 0.5 s) before its first step can finish, so it never completes instead.
ENRICH_LATENCY_MS = 1000


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
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
        completes = made[:5]
        # The sandbox refuses a "bounce" mailbox for good: the email step fails, so does the run.
        bounces = [r.model_copy(update={"contact_email": f"bounce@{r.company_domain}"}) for r in made[5:7]]
        # RFC 2606 .invalid: the enrichment API answers 404, a permanent error of the first step.
        unknown = [made[7].model_copy(update={"company_domain": "no-such-company.invalid"})]
        # Requested 30 s ago with a 1 s deadline: the run escalates at once (what it started is undone).
        late = [
            r.model_copy(update={"deadline_s": 1.0, "occurred_at": now() - timedelta(seconds=30)}) for r in made[8:]
        ]
        requests = [*completes, *bounces, *unknown, *late]
        run_ids = produce_requests(s, requests)
        events = eventually(lambda: _settled(s, run_ids), timeout=90, what="runs ended, every command answered")

        expected_status = {
            **{r.run_id: "completed" for r in completes},
            **{r.run_id: "failed" for r in [*bounces, *unknown]},
            **{r.run_id: "escalated" for r in late},
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
        reasons = [(r["status"], r["step"], r["runs"]) for r in report["failure_reasons"]]
        assert reasons[:2] == [("escalated", None, 2), ("failed", "email", 2)] and reasons[2:] == [
            ("failed", "enrich", 1)
        ]
        assert "deadline <time> passed" in report["failure_reasons"][0]["reason"]
        assert "recipient rejected" in report["failure_reasons"][1]["reason"]

        # Counted by the test from the projected event log, independently of the report's SQL.
        decisions = [(r, p) for r, t, p, _ in events if t == "DecisionRecorded"]
        results = [p for _, t, p, _ in events if t == "ToolResult"]
        assert total["decisions"] == len(decisions)
        assert total["tool_calls"] == sum(p["action"] in ("dispatch", "compensate") for _, p in decisions)
        assert total["min_tool_calls"] == 10 * STEPS
        # A run that ends early dispatches fewer commands than its workflow's steps: no excess here.
        assert total["excess_tool_calls"] == 0
        assert total["retries"] == ENRICH_FAULTS
        assert total["tool_attempts"] == len(results) + ENRICH_FAULTS
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
        assert total["duration_max_s"] == pytest.approx(durations[-1]) and durations[-1] >= 30
        # The rules decide for free; governance has not refused or held anything here.
        assert (total["cost_usd"], total["cost_per_completed_usd"], total["prompt_tokens"]) == (0, 0, 0)
        assert (total["guard_refusals"], total["approvals"], total["approval_wait_p95_s"]) == (0, 0, None)

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
        assert scrape(port, "streamagent_run_retries_total", onboarding) == ENRICH_FAULTS
