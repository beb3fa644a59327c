"""Take docs/ui.png: the run timeline page of a fresh embedded stack, with runs decided by the model.

    .venv/bin/python docs/ui_screenshot.py [OUT.png]

Starts the embedded stack (its own temporary data dir) with the scripted fake model as the decider
and a flaky Jira (two 503s, so a step shows retries), submits six onboarding runs, waits until they
end, then opens one run's timeline in headless Chromium (tests/browser.py, the tests' driver) with its
first model decision's context unfolded, and saves what the browser shows.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import Page, chromium  # noqa: E402
from streamagent.processors.projection import queries  # noqa: E402
from streamagent.tools.sandbox.model import FakeModel  # noqa: E402

from streamagent.config import Settings  # noqa: E402
from streamagent.console.demo import sample_requests  # noqa: E402
from streamagent.console.devstack.stack import Stack  # noqa: E402
from streamagent.submit import produce_requests  # noqa: E402

PRICES = json.dumps({"fake-model": {"prompt": 0.00015, "completion": 0.0006}})


def main(out: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp, FakeModel() as model:
        settings = Settings(
            data_dir=Path(tmp) / "data",
            decider="llm",
            openai_base_url=model.url,
            model="fake-model",
            model_prices=PRICES,
            log_format="json",
        )
        faults = {"jira": {"fail_next": 2}}
        with Stack(settings, ui_port=0, sandbox_faults=faults) as stack:
            s = stack.settings
            run_ids = produce_requests(s, sample_requests(6))
            deadline = time.monotonic() + 180
            while not all((r := queries.run(s, i)) and r.status != "running" for i in run_ids):
                if time.monotonic() > deadline:
                    raise SystemExit("the runs did not end within 180 s")
                time.sleep(0.5)  # poll under a deadline
            # the run whose Jira call was retried, if the two 503s landed on one run
            shown = next(
                (
                    i
                    for i in run_ids
                    if any(e.type == "ToolResult" and e.payload.get("attempts", 1) > 1 for e in queries.timeline(s, i))
                ),
                run_ids[0],
            )
            with Page(chromium(), Path(tmp) / "chromium", width=1440, height=1000) as page:
                page.goto(f"{stack.ui_url}/#/runs/{shown}")
                page.wait_for(f"document.querySelector('#run-detail[data-run-id=\"{shown}\"]') !== null")
                page.wait_for("document.querySelectorAll('#runs tbody tr').length === 6")
                page.evaluate(
                    "document.querySelector('#timeline .entry[data-type=\"DecisionRecorded\"] details').open = true"
                )
                time.sleep(0.3)  # let the unfolded details paint before the capture
                page.screenshot(out)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "ui.png"))
