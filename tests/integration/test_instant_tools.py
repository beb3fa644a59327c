"""Instant tools (STREAMAGENT_TOOLS_INSTANT, ``bench/load.py --instant-tools``): the tools answer from the
sandbox's API model inside their own process. No HTTP call reaches the sandbox server, and everything
else of a tool stays: every step's ledger row once, one result per step, the run completes.
"""

from __future__ import annotations

from collections import Counter

import psycopg
import pytest
from helpers import ended, eventually
from streamagent.tools.sandbox import API_NAMES, SandboxClient

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

STEPS = 5  # enrich, jira, draft, email, slack: the onboarding workflow


def test_instant_tools_skip_http_and_keep_the_ledger(settings: Settings) -> None:
    with Stack(settings.model_copy(update={"tools_instant": True})) as stack:
        s = stack.settings
        run_ids = produce_requests(s, sample_requests(4))
        rows = eventually(lambda: ended(s, run_ids), timeout=120, what="runs ended")
        assert Counter(r.status for r in rows) == {"completed": 4}
        with SandboxClient(s.sandbox_url) as sandbox:
            assert sandbox.effects() == []
            stats = sandbox.stats()
        assert {api: stats[api]["requests"] for api in API_NAMES} == dict.fromkeys(API_NAMES, 0)
        with psycopg.connect(s.database_url) as conn:
            ledger = conn.execute(
                "SELECT run_id, step, status, count(*) FROM tool_ledger WHERE run_id = ANY(%s) GROUP BY 1, 2, 3",
                (run_ids,),
            ).fetchall()
            results = conn.execute(
                "SELECT run_id, payload->>'step', count(*) FROM run_events"
                " WHERE run_id = ANY(%s) AND type = 'ToolResult' GROUP BY 1, 2",
                (run_ids,),
            ).fetchall()
    assert all(status == "succeeded" and n == 1 for _r, _step, status, n in ledger), ledger
    assert Counter(r for r, *_ in ledger) == dict.fromkeys(run_ids, STEPS)
    assert {(r, step) for r, step, _status, _n in ledger} == {(r, step) for r, step, _n in results}
    assert all(n == 1 for *_, n in results), results
