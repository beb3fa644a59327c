"""The run timeline page in a real headless Chromium, on the real embedded stack.

The page is loaded before the run exists; the run is submitted during the test (with Slack down, so
it stays in flight at its last step) and must appear as ``running`` with three steps done, then, once
Slack is back, reach ``completed`` on screen without a reload (the page refreshes itself), and its
timeline must show the four onboarding steps. A poison message shows on the dead-letters tab with its
reason. The JSON endpoints the page reads are checked on the same stack (a 400 for a bad filter, 404
for an unknown run, no writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from browser import Page, chromium
from streamagent.tools.sandbox import SandboxClient
from streamagent.tools.sandbox.faults import FaultSpec

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.kafka import producer
from streamagent.submit import produce_requests
from streamagent.topics import RUN_EVENTS

pytestmark = pytest.mark.integration

STEPS = ["enrich", "jira", "email", "slack"]


def _js(value: str) -> str:
    return json.dumps(value)  # a string literal for an expression


def test_a_run_submitted_while_the_page_is_open_shows_live_until_completed(settings: Settings, tmp_path: Path) -> None:
    binary = chromium()
    with Stack(settings, ui_port=0) as stack, Page(binary, tmp_path / "chromium") as page:
        s = stack.settings
        page.goto(stack.ui_url + "/")
        page.wait_for("document.querySelector('#live.on') !== null", timeout=60, what="the page's first refresh")
        assert page.evaluate("document.title") == "streamagent · runs"
        assert page.evaluate("document.querySelectorAll('#runs tbody tr').length") == 0

        # Slack is down while the runs are submitted: each run holds at its last step, in flight.
        sandbox = SandboxClient(s.sandbox_url)
        sandbox.set_faults("slack", FaultSpec(down=True))
        runs = sample_requests(3)
        run_id = runs[0].run_id
        produce_requests(s, runs)
        row = f"document.querySelector('#runs tr[data-run-id=\"{run_id}\"]')"
        page.wait_for(f"{row} !== null", timeout=60, what=f"run {run_id} in the list")
        page.evaluate(f"{row}.click()")
        detail = f"document.querySelector('#run-detail[data-run-id=\"{run_id}\"]')"
        chips = (
            "[...document.querySelectorAll('#steps li')].map(li => `${li.dataset.step}:${li.dataset.status}`).join()"
        )
        page.wait_for(
            f"{chips} === 'enrich:succeeded,jira:succeeded,email:succeeded,slack:running'",
            timeout=90,
            what="three steps done and slack retrying, on screen",
        )
        assert page.evaluate(f"{row}.querySelector('td.status').textContent") == "running"
        assert page.evaluate(f"{detail}.dataset.status") == "running"
        # No reason until it ends, and nothing in its place (no stray text such as "null").
        assert page.evaluate(f"{detail}.querySelector('.reason') === null")
        assert page.evaluate(f"[...{detail}.childNodes].every(node => node.nodeType === Node.ELEMENT_NODE)")

        # Slack is back: the same page, never reloaded, shows the run completed.
        sandbox.clear_faults()
        page.wait_for(
            f"{row}.querySelector('td.status').textContent === 'completed'",
            timeout=90,
            what=f"run {run_id} completed on screen",
        )
        page.wait_for(f"{detail}.dataset.status === 'completed'", timeout=60, what="the completed run's timeline")
        results = page.evaluate(
            "[...document.querySelectorAll('#timeline .entry[data-type=\"ToolResult\"]')].map(e => e.dataset.step)"
        )
        assert results == STEPS
        types = page.evaluate("[...document.querySelectorAll('#timeline .entry')].map(e => e.dataset.type)")
        assert types[0] == "RunRequested" and types[-1] == "RunCompleted"
        assert types.count("DecisionRecorded") == 5 and types.count("ToolCommand") == 4
        assert page.evaluate(chips) == ",".join(f"{step}:succeeded" for step in STEPS)
        assert page.evaluate(f"{detail}.querySelector('.reason').textContent") == "every step succeeded"
        # A result's details say its attempts (slack's: several, through the outage) and latency.
        details = page.evaluate(
            'document.querySelector(\'#timeline .entry[data-type="ToolResult"][data-step="slack"] details\')'
            ".textContent"
        )
        attempts = int(details.split("attempts: ")[1].split("latency")[0])
        assert attempts > 1 and "latency:" in details

        # Search narrows the list to the one company.
        page.evaluate(
            f"const box = document.querySelector('#search'); box.value = {_js(runs[1].company_name)};"
            " box.dispatchEvent(new Event('input'))"
        )
        page.wait_for(
            "[...document.querySelectorAll('#runs tbody tr')].map(r => r.dataset.runId).join()"
            f" === {_js(runs[1].run_id)}",
            timeout=60,
            what="the search result",
        )

        # A message no processor can decode: dead-lettered, and listed with its reason.
        p = producer(s)
        p.produce(s.topic(RUN_EVENTS), key=b"poison-run", value=b"not an avro event")
        assert p.flush(10) == 0
        page.evaluate("location.hash = '#/dlq'")
        letter = "document.querySelector('#dlq tbody tr td a[href=\"#/runs/poison-run\"]')"
        page.wait_for(f"{letter} !== null", timeout=60, what="the dead letter on the dead-letters tab")
        reason = page.evaluate(f"{letter}.closest('tr').dataset.reason")
        assert reason and reason != "?"

        # The endpoints are read-only and say what is wrong in one line.
        api = stack.ui_url + "/api"
        assert httpx.get(f"{api}/runs", params={"status": "done"}).status_code == 400
        assert httpx.get(f"{api}/runs/no-such-run").json() == {"error": "no run no-such-run"}
        assert httpx.post(f"{api}/runs").status_code == 405
        body = httpx.get(f"{api}/runs", params={"status": "completed", "q": runs[2].company_domain}).json()
        assert [r["run_id"] for r in body["runs"]] == [runs[2].run_id] and body["counts"]["completed"] == 3
