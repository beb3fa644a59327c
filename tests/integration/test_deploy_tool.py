"""Add a tool by deploying its consumer group: runs of a workflow that needs `crm` wait for it, then
`streamagent tool crm` is started into the running stack and they complete. No restart, nothing in
processors/ names the tool, and every step has one effect per run."""

from __future__ import annotations

import io
import tokenize
from collections import Counter
from pathlib import Path

import pytest
from helpers import ended, eventually
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import SandboxClient

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.stack import Stack
from streamagent.submit import produce_requests

pytestmark = pytest.mark.integration

WORKFLOW = "onboarding-with-crm"
APIS = ["crm", "email", "enrich", "jira", "slack"]
PROCESSORS = Path(__file__).resolve().parents[2] / "processors"


def names_crm(path: Path) -> bool:
    """Does the code (a name or a string, not a comment) of ``path`` mention crm?"""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return any(t.type in (tokenize.NAME, tokenize.STRING) and "crm" in t.string.lower() for t in tokens)


def test_runs_waiting_for_crm_complete_once_the_crm_tool_is_deployed(settings: Settings) -> None:
    assert [p for p in PROCESSORS.rglob("*") if "crm" in p.name.lower() or (p.suffix == ".py" and names_crm(p))] == []
    requests = [r.model_copy(update={"workflow": WORKFLOW}) for r in sample_requests(3)]
    with Stack(settings, tools=("enrich", "jira", "email", "slack")) as stack:
        s = stack.settings
        run_ids = produce_requests(s, requests)

        def all_waiting() -> list[queries.RunRow] | None:
            rows = [r for r in queries.runs(s) if r.run_id in run_ids]
            ok = len(rows) == len(run_ids) and all(
                r.status == "running" and r.reason == "waiting for tool crm" for r in rows
            )
            return rows if ok else None

        rows = eventually(all_waiting, timeout=40, interval=0.2, what="the runs waiting for tool crm")
        assert all(r.steps_done == 1 and r.workflow == "onboarding-with-crm" for r in rows)  # enrich done, crm next
        assert {e.api for e in SandboxClient(s.sandbox_url).effects()} == {"enrich"}
        started = {name: child.pid for name, child in stack.children.items()}

        stack.add_tool("crm")  # its own consumer group, into the running stack

        rows = eventually(lambda: ended(s, run_ids), timeout=40, interval=0.2, what="the runs ended")
        assert Counter(r.status for r in rows) == {"completed": len(run_ids)}, [(r.run_id, r.reason) for r in rows]
        assert all(r.steps_done == 5 for r in rows)
        # Nothing was restarted: the processors and the first tools are the processes they were.
        assert {n: c.pid for n, c in stack.children.items() if n in started} == started
        assert {n: c.restarts for n, c in stack.children.items() if c.restarts} == {}

        effects = SandboxClient(s.sandbox_url).effects()
        for run_id in run_ids:
            mine = Counter(e.api for e in effects if e.run_id == run_id)
            assert sorted(mine) == APIS and set(mine.values()) == {1}, (run_id, mine)
        accounts = [e for e in effects if e.api == "crm"]
        assert all(e.status == 201 and e.response["created"] is True for e in accounts)
        assert sorted(e.request["name"] for e in accounts) == sorted(r.company_name for r in requests)
