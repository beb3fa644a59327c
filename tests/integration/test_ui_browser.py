"""The run timeline page in a real headless Chromium, on the real embedded stack.

The page is loaded before the run exists; the run is submitted during the test (with Slack down, so
it stays in flight at its last step) and must appear as ``running`` with four steps done, then, once
Slack is back, reach ``completed`` on screen without a reload (the page refreshes itself), and its
timeline must show the four onboarding steps. A poison message shows on the dead-letters tab with its
reason. The JSON endpoints the page reads are checked on the same stack (a 400 for a bad filter, 404
for an unknown run, no writes).

On the same stack, one more run mails a contact the policy holds for approval: the header counts it on
every view, the approvals view shows its recipient, subject and rule, and the approve command it shows,
pasted into a shell, lets the run finish (the count falls back to 0). The timeline lists each decision
before the command it caused and the step cards tell the step's whole span. Last, the list pages by
cursor: with two runs a page, the "older" button brings the two older runs, newest first.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import httpx
import pytest
from browser import Page, chromium
from helpers import ended, eventually
from streamagent.tools.sandbox import SandboxClient
from streamagent.tools.sandbox.faults import FaultSpec

from streamagent.config import Settings, child_environ
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.kafka import producer
from streamagent.submit import produce_requests
from streamagent.topics import RUN_EVENTS

pytestmark = pytest.mark.integration

STEPS = ["enrich", "jira", "draft", "email", "slack"]

# Mail to held.example waits for a person; the sample runs mail elsewhere and go straight through.
HOLD_POLICY = """
[approvals]
timeout_s = 600

[[approvals.rules]]
tool = "email"
argument = "to"
matching = '@held\\.example$'
reason = "mail to held.example needs a person"
"""


def _js(value: str) -> str:
    return json.dumps(value)  # a string literal for an expression


def _approvals_count(page: Page) -> str:
    return str(page.evaluate("document.querySelector('#approvals-count').dataset.count"))


def test_a_run_submitted_while_the_page_is_open_shows_live_until_completed(settings: Settings, tmp_path: Path) -> None:
    binary = chromium()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "approvals.toml").write_text(HOLD_POLICY)
    settings = settings.model_copy(update={"policies_dir": policies})
    with Stack(settings, ui_port=0) as stack, Page(binary, tmp_path / "chromium") as page:
        s = stack.settings
        page.goto(stack.ui_url + "/")
        page.wait_for("document.querySelector('#live.on') !== null", timeout=60, what="the page's first refresh")
        assert page.evaluate("document.title") == "streamagent · runs"
        assert page.evaluate("document.querySelectorAll('#runs tbody tr').length") == 0
        assert _approvals_count(page) == "0"

        # Slack is down while the runs are submitted: each run holds at its last step, in flight.
        sandbox = SandboxClient(s.sandbox_url)
        sandbox.set_faults("slack", FaultSpec(down=True))
        runs = sample_requests(3)
        run_id = runs[0].run_id
        base = sample_requests(4)[3]
        held = base.model_copy(update={"contact_email": "alice@held.example"})
        produce_requests(s, [*runs, held])
        row = f"document.querySelector('#runs tr[data-run-id=\"{run_id}\"]')"
        page.wait_for(f"{row} !== null", timeout=60, what=f"run {run_id} in the list")
        page.evaluate(f"{row}.click()")
        detail = f"document.querySelector('#run-detail[data-run-id=\"{run_id}\"]')"
        chips = (
            "[...document.querySelectorAll('#steps li')].map(li => `${li.dataset.step}:${li.dataset.status}`).join()"
        )
        page.wait_for(
            f"{chips} === 'enrich:succeeded,jira:succeeded,draft:succeeded,email:succeeded,slack:running'",
            timeout=90,
            what="four steps done and slack retrying, on screen",
        )
        assert page.evaluate(f"{row}.querySelector('td.status').textContent") == "running"
        assert page.evaluate(f"{detail}.dataset.status") == "running"
        # No reason until it ends, and nothing in its place (no stray text such as "null").
        assert page.evaluate(f"{detail}.querySelector('.reason') === null")
        assert page.evaluate(f"[...{detail}.childNodes].every(node => node.nodeType === Node.ELEMENT_NODE)")
        # The held run is counted in the header while the runs view is shown.
        page.wait_for(
            "document.querySelector('#approvals-count').dataset.count === '1'", timeout=60, what="1 run held, counted"
        )

        # Slack is back once each of the three runs' calls was refused at least once (so the run's slack
        # step shows several attempts): the same page, never reloaded, shows the run completed.
        eventually(
            lambda: all(sandbox.requests("slack", r.run_id) >= 1 for r in runs),
            timeout=60,
            what="slack refused each run",
        )
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
        assert types.count("DecisionRecorded") == 6 and types.count("ToolCommand") == 5
        assert page.evaluate(chips) == ",".join(f"{step}:succeeded" for step in STEPS)
        assert page.evaluate(f"{detail}.querySelector('.reason').textContent") == "every step succeeded"
        # A result's details say its attempts (slack's: several, through the outage) and latency.
        details = page.evaluate(
            'document.querySelector(\'#timeline .entry[data-type="ToolResult"][data-step="slack"] details\')'
            ".textContent"
        )
        attempts = int(details.split("attempts: ")[1].split("latency")[0])
        assert attempts > 1 and "latency of the last execution:" in details
        # Each decision is listed before the command it caused, each command before its result.
        listed = page.evaluate(
            "[...document.querySelectorAll('#timeline .entry')].map(e => `${e.dataset.type}:${e.dataset.step}`)"
        )
        for step in STEPS:
            order = [listed.index(f"{kind}:{step}") for kind in ("DecisionRecorded", "ToolCommand", "ToolResult")]
            assert order == sorted(order), (step, listed)
        # Slack's card tells the step's span, first command to final result: the whole outage.
        shown = httpx.get(f"{stack.ui_url}/api/runs/{run_id}").json()
        slack = next(st for st in shown["steps"] if st["name"] == "slack")
        at = {(e["type"], e["step"]): e["offset_ms"] for e in shown["timeline"]}
        assert slack["duration_ms"] == at[("ToolResult", "slack")] - at[("ToolCommand", "slack")]
        assert slack["duration_ms"] >= slack["last_call_ms"] and slack["attempts"] == attempts
        card = page.evaluate("document.querySelector('#steps li[data-step=\"slack\"]').textContent")
        assert f"{attempts} attempts · " in card, card

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

        # The approvals view: the held step, what it would send to whom, the rule, and how to answer.
        page.evaluate("location.hash = '#/approvals'")
        approval = f"document.querySelector('#approvals tr[data-run-id=\"{held.run_id}\"]')"
        page.wait_for(f"{approval} !== null", timeout=60, what="the held step on the approvals view")
        cells = page.evaluate(f"[...{approval}.cells].map(c => c.textContent)")
        assert cells[0] == held.run_id[:8] and cells[1].startswith("onboarding") and cells[2:4] == ["email", "email"]
        assert cells[4] == f"to=alice@held.example subject=Welcome to streamagent, {held.company_name}"
        assert cells[5].startswith("mail to held.example needs a person") and cells[6].endswith(" ago")
        assert cells[7].startswith("in ")
        approve = page.evaluate(f"{approval}.querySelector('code.approve').textContent")
        assert approve == f"streamagent approve {held.run_id} email"
        deny = page.evaluate(f"{approval}.querySelector('code.deny').textContent")
        assert deny == f"streamagent deny {held.run_id} email --note WHY"
        assert "read-only" in page.evaluate("document.querySelector('#approvals-view .readonly').textContent")
        # The command as shown, pasted: the run goes on and completes, and the count falls back to 0.
        answered = subprocess.run(
            [sys.executable, "-m", "streamagent.console.cli", *shlex.split(approve)[1:]],
            env=child_environ(s),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert answered.returncode == 0, answered.stderr
        page.wait_for("document.querySelector('#approvals-count').dataset.count === '0'", timeout=60, what="0 held")
        page.wait_for(f"{approval} === null", timeout=30, what="the answered step gone from the approvals view")
        eventually(lambda: ended(s, [held.run_id]), timeout=60, what="the approved run's end")

        # A message no processor can decode: dead-lettered, and listed with its reason.
        p = producer(s)
        p.produce(s.topic(RUN_EVENTS), key=b"poison-run", value=b"not an avro event")
        assert p.flush(10) == 0
        page.evaluate("location.hash = '#/dlq'")
        letter = "document.querySelector('#dlq tbody tr td a[href=\"#/runs/poison-run\"]')"
        page.wait_for(f"{letter} !== null", timeout=60, what="the dead letter on the dead-letters tab")
        reason = page.evaluate(f"{letter}.closest('tr').dataset.reason")
        assert reason and reason != "?"
        assert page.evaluate("document.querySelector('#nav-approvals').offsetParent !== null")  # on every view

        # The endpoints are read-only and say what is wrong in one line.
        api = stack.ui_url + "/api"
        assert httpx.get(f"{api}/runs", params={"status": "done"}).status_code == 400
        assert httpx.get(f"{api}/runs/no-such-run").json() == {"error": "no run no-such-run"}
        assert httpx.post(f"{api}/runs").status_code == 405
        body = httpx.get(f"{api}/runs", params={"status": "completed", "q": runs[2].company_domain}).json()
        assert [r["run_id"] for r in body["runs"]] == [runs[2].run_id] and body["counts"]["completed"] == 4
        assert httpx.get(f"{api}/approvals").json() == {"approvals": [], "waiting_runs": 0, "at": ANY}

        # Two runs a page: the newest two, then "older" brings the next two by cursor, and no more.
        newest_first = [r["run_id"] for r in httpx.get(f"{api}/runs").json()["runs"]]
        assert len(newest_first) == 4
        page.goto(stack.ui_url + "/?page_size=2#/")
        listed_ids = "[...document.querySelectorAll('#runs tbody tr')].map(r => r.dataset.runId).join()"
        page.wait_for(f"{listed_ids} === {_js(','.join(newest_first[:2]))}", timeout=60, what="the newest page")
        assert page.evaluate("document.querySelector('#older').hidden") is False
        page.evaluate("document.querySelector('#older').click()")
        page.wait_for(f"{listed_ids} === {_js(','.join(newest_first))}", timeout=60, what="the older page")
        page.wait_for("document.querySelector('#older').hidden", timeout=30, what="no older page left")
