"""The run timeline page in a real headless Chromium, on the real embedded stack.

The page is loaded before the run exists; the run is submitted during the test and must appear, reach
``completed`` on screen without a reload (the page refreshes itself), and its timeline must show the four
onboarding steps. A poison message shows on the dead-letters tab with its reason. The JSON endpoints the
page reads are checked on the same stack (a 400 for a bad filter, 404 for an unknown run, no writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from browser import Page, chromium

from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.stack import Stack
from streamagent.kafka import producer
from streamagent.submit import produce_requests
from streamagent.topics import RUN_EVENTS

pytestmark = pytest.mark.integration

STEPS = ["enrich", "jira", "email", "slack"]


def _js(value: str) -> str:
    return json.dumps(value)  # a string literal for an expression


def test_a_run_submitted_while_the_page_is_open_shows_live_until_completed(
    settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    binary = chromium()
    with Stack(settings, ui_port=0) as stack, Page(binary, tmp_path / "chromium") as page:
        s = stack.settings
        page.goto(stack.ui_url + "/")
        page.wait_for("document.querySelector('#live.on') !== null", what="the page's first refresh")
        assert page.evaluate("document.title") == "streamagent · runs"
        assert page.evaluate("document.querySelectorAll('#runs tbody tr').length") == 0

        runs = sample_requests(3)
        run_id = runs[0].run_id
        produce_requests(s, runs)
        row = f"document.querySelector('#runs tr[data-run-id=\"{run_id}\"]')"
        page.wait_for(f"{row} !== null", timeout=30, what=f"run {run_id} in the list")
        page.wait_for(
            f"{row}.querySelector('td.status').textContent === 'completed'",
            timeout=90,
            what=f"run {run_id} completed on screen",
        )

        # Its timeline: every step's command and result, in order, each step succeeded.
        page.evaluate(f"{row}.click()")
        detail = f"document.querySelector('#run-detail[data-run-id=\"{run_id}\"]')"
        page.wait_for(f"{detail} && {detail}.dataset.status === 'completed'", what="the run's timeline")
        results = page.evaluate(
            "[...document.querySelectorAll('#timeline .entry[data-type=\"ToolResult\"]')].map(e => e.dataset.step)"
        )
        assert results == STEPS
        types = page.evaluate("[...document.querySelectorAll('#timeline .entry')].map(e => e.dataset.type)")
        assert types[0] == "RunRequested" and types[-1] == "RunCompleted"
        assert types.count("DecisionRecorded") == 5 and types.count("ToolCommand") == 4
        chips = page.evaluate(
            "[...document.querySelectorAll('#steps li')].map(li => [li.dataset.step, li.dataset.status])"
        )
        assert chips == [[step, "succeeded"] for step in STEPS]
        # A result's details say its attempts and latency.
        details = page.evaluate(
            "document.querySelector('#timeline .entry[data-type=\"ToolResult\"] details').textContent"
        )
        assert "attempts: 1" in details and "latency:" in details

        # Search narrows the list to the one company.
        page.evaluate(
            f"const box = document.querySelector('#search'); box.value = {_js(runs[1].company_name)};"
            " box.dispatchEvent(new Event('input'))"
        )
        page.wait_for(
            "[...document.querySelectorAll('#runs tbody tr')].map(r => r.dataset.runId).join()"
            f" === {_js(runs[1].run_id)}",
            what="the search result",
        )
        if request.config.getoption("--ui-screenshot"):
            page.evaluate(
                "document.querySelector('#search').value = ''; document.querySelector('#search')"
                ".dispatchEvent(new Event('input'))"
            )
            page.wait_for("document.querySelectorAll('#runs tbody tr').length === 3")
            page.evaluate("document.querySelector('#timeline details').open = true")  # the request's payload
            page.screenshot(Path(request.config.getoption("--ui-screenshot")))

        # A message no processor can decode: dead-lettered, and listed with its reason.
        p = producer(s)
        p.produce(s.topic(RUN_EVENTS), key=b"poison-run", value=b"not an avro event")
        assert p.flush(10) == 0
        page.evaluate("location.hash = '#/dlq'")
        letter = "document.querySelector('#dlq tbody tr td a[href=\"#/runs/poison-run\"]')"
        page.wait_for(f"{letter} !== null", timeout=30, what="the dead letter on the dead-letters tab")
        reason = page.evaluate(f"{letter}.closest('tr').dataset.reason")
        assert reason and reason != "?"

        # The endpoints are read-only and say what is wrong in one line.
        api = stack.ui_url + "/api"
        assert httpx.get(f"{api}/runs", params={"status": "done"}).status_code == 400
        assert httpx.get(f"{api}/runs/no-such-run").json() == {"error": "no run no-such-run"}
        assert httpx.post(f"{api}/runs").status_code == 405
        body = httpx.get(f"{api}/runs", params={"status": "completed", "q": runs[2].company_domain}).json()
        assert [r["run_id"] for r in body["runs"]] == [runs[2].run_id] and body["counts"]["completed"] == 3
