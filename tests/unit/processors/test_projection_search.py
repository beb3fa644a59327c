"""The run timeline page's list query on the real PostgreSQL: newest first, status filter, search."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from streamagent.processors.projection import queries
from streamagent.processors.projection.schema import SCHEMA

from streamagent import db
from streamagent.config import Settings

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
RUNS = [
    # run_id, company, domain, contact, status, reason, minutes after T0
    ("r-acme", "Acme Robotics", "acme.io", "ada@acme.io", "completed", "every step succeeded", 0),
    ("r-globex", "Globex", "globex.com", "hank@globex.com", "failed", "jira: 100% of calls refused", 1),
    ("r-initech", "Initech", "initech.com", "bill@initech.com", "running", None, 2),
    ("r-acme2", "ACME Holdings", "acme-holdings.eu", "wile@acme-holdings.eu", "escalated", "deadline passed", 3),
]


def _seed(settings: Settings) -> None:
    db.migrate(settings, SCHEMA)
    with db.connect(settings) as conn:
        for run_id, company, domain, contact, status, reason, minutes in RUNS:
            conn.execute(
                "INSERT INTO runs (run_id, company_name, company_domain, contact_email, requested_by, status,"
                " reason, steps_done, created_at, workflow) VALUES (%s, %s, %s, %s, 'crm', %s, %s, 0, %s,"
                " 'onboarding')",
                (run_id, company, domain, contact, status, reason, T0 + timedelta(minutes=minutes)),
            )


def _ids(rows: list[queries.RunRow]) -> list[str]:
    return [r.run_id for r in rows]


def test_the_newest_runs_come_first_filtered_and_searched(settings: Settings) -> None:
    _seed(settings)
    assert _ids(queries.search_runs(settings)) == ["r-acme2", "r-initech", "r-globex", "r-acme"]
    assert _ids(queries.search_runs(settings, limit=2)) == ["r-acme2", "r-initech"]
    assert _ids(queries.search_runs(settings, status="failed")) == ["r-globex"]
    # any case, any searched column: company, domain, contact, reason, run id
    assert _ids(queries.search_runs(settings, text="acme")) == ["r-acme2", "r-acme"]
    assert _ids(queries.search_runs(settings, text="acme", status="completed")) == ["r-acme"]
    assert _ids(queries.search_runs(settings, text="BILL@")) == ["r-initech"]
    assert _ids(queries.search_runs(settings, text="deadline")) == ["r-acme2"]
    assert _ids(queries.search_runs(settings, text="r-glob")) == ["r-globex"]
    # LIKE's wildcards are searched for as themselves
    assert _ids(queries.search_runs(settings, text="100%")) == ["r-globex"]
    assert _ids(queries.search_runs(settings, text="%")) == ["r-globex"]
    assert _ids(queries.search_runs(settings, text="r_acme")) == []
    assert _ids(queries.search_runs(settings, text="  ")) == _ids(queries.search_runs(settings))
    assert queries.count_by_status(settings) == {"completed": 1, "failed": 1, "running": 1, "escalated": 1}
