"""The demo: the embedded stack, N onboarding requests, live progress, a summary table."""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from streamagent.config import ENV_PREFIX, Settings
from streamagent.events import RunRequested, new_id
from streamagent.processors.projection import queries
from streamagent.processors.projection.queries import RunRow
from streamagent.submit import produce_requests

if TYPE_CHECKING:
    from streamagent.console.devstack.stack import Stack

COMPANIES = [
    ("Acme Robotics", "acme-robotics.io", "Ada Lovelace"),
    ("Globex", "globex.com", "Hank Scorpio"),
    ("Initech", "initech.com", "Peter Gibbons"),
    ("Umbrella Health", "umbrella-health.eu", "Alice Abernathy"),
    ("Stark Logistics", "stark-logistics.com", "Pepper Potts"),
    ("Wayne Analytics", "wayne-analytics.io", "Lucius Fox"),
    ("Cyberdyne", "cyberdyne.ai", "Miles Dyson"),
    ("Tyrell Bio", "tyrell.bio", "Rachael Rosen"),
]


def sample_requests(count: int, requested_by: str = "demo-crm") -> list[RunRequested]:
    requests = []
    for i in range(count):
        name, domain, contact = COMPANIES[i % len(COMPANIES)]
        suffix = "" if i < len(COMPANIES) else f" {i // len(COMPANIES) + 1}"
        first = contact.split()[0].lower()
        requests.append(
            RunRequested(
                run_id=new_id(),
                company_name=name + suffix,
                company_domain=domain,
                contact_name=contact,
                contact_email=f"{first}@{domain}",
                goal="onboard new B2B client",
                requested_by=requested_by,
            )
        )
    return requests


class NoProgress(RuntimeError):
    """The runs cannot make progress (a process they need keeps crashing)."""


def wait_for_runs(
    settings: Settings,
    run_ids: list[str],
    timeout_s: float,
    progress: bool = False,
    stuck: Callable[[], str | None] | None = None,
) -> list[RunRow]:
    """Poll the projection until every run has ended or the timeout passes; returns the final rows.

    ``stuck`` is asked on every poll; a message from it ends the wait at once with NoProgress."""
    from streamagent.console.tables import steps_per_workflow

    deadline = time.monotonic() + timeout_s
    wanted = set(run_ids)
    steps_of = steps_per_workflow(settings) if progress else {}
    last_line = ""
    while True:
        reason = stuck() if stuck is not None else None
        if reason:
            raise NoProgress(reason)
        rows = [r for r in queries.runs(settings, limit=100_000) if r.run_id in wanted]
        ended = [r for r in rows if r.status != "running"]
        if progress:
            counts = {s: sum(1 for r in rows if r.status == s) for s in ("completed", "failed", "escalated")}
            steps = sum(r.steps_done for r in rows)
            total = sum(steps_of.get(r.workflow or "", 0) for r in rows) or "?"
            line = (
                f"  {len(ended)}/{len(run_ids)} runs ended ({counts['completed']} completed, {counts['failed']} failed,"
                f" {counts['escalated']} escalated), {steps}/{total} steps done"
            )
            if line != last_line:
                print(line, flush=True)
                last_line = line
        if len(ended) == len(run_ids) or time.monotonic() > deadline:
            order = {run_id: i for i, run_id in enumerate(run_ids)}
            return sorted(rows, key=lambda r: order[r.run_id])
        time.sleep(0.25)  # polling interval of a progress display


def drafts(settings: Settings, run_ids: list[str]) -> list[dict[str, object]]:
    """Who wrote each run's welcome email: the output of its ``draft`` step (``drafted_by`` model or
    template, and why the template), read from the run's timeline; runs with no draft are left out."""
    found = []
    for run_id in run_ids:
        for entry in queries.timeline(settings, run_id):
            output = entry.payload.get("output")
            drafted = isinstance(output, dict) and output.get("drafted_by")
            if entry.type == "ToolResult" and entry.payload.get("tool") == "draft" and drafted:
                found.append({"run_id": run_id, **output})
    return found


def drafts_line(found: list[dict[str, object]]) -> str | None:
    """``welcome emails: 2 drafted by the model, 1 by the template (no model configured ...)``."""
    if not found:
        return None
    by_model = sum(1 for d in found if d.get("drafted_by") == "model")
    reasons = sorted({str(d.get("fallback_reason")) for d in found if d.get("drafted_by") != "model"})
    template = f", {len(found) - by_model} by the template ({'; '.join(reasons)})" if len(found) > by_model else ""
    return f"welcome emails: {by_model} drafted by the model{template}"


def start_own_stack(settings: Settings, report: Callable[[str], None] | None = None) -> Stack:
    """A stack for the demo. If ``up`` already runs in the data dir, the demo leaves it alone and runs
    its own stack in ``<data_dir>/demo`` instead (and says so)."""
    from streamagent.console.devstack.stack import Stack, StackRunning

    # Free ports: a demo is thrown away when it ends, nothing attaches to its addresses, and it must run
    # beside an `up` (here or in another project) that holds the fixed ones.
    settings = settings.model_copy(update={"broker_port": 0, "sandbox_port": 0})
    try:
        return Stack(settings, report=report).start()
    except StackRunning as exc:
        own = exc.data_dir / "demo"
        print(
            f"  a stack is already running in {exc.data_dir} (pid {exc.pid or '?'}); the demo leaves it alone"
            f" and runs its own in {own}",
            flush=True,
        )
        return Stack(settings.model_copy(update={"data_dir": own}), report=report).start()


def timeline_hint(run_id: str, stack_dir: Path, data_dir: Path) -> str:
    """The demo's closing line: the ``show`` command for one of its runs, with the whole run id, and the
    data dir it needs when the demo ran its own stack beside a running one (``streamagent show`` reads
    the stack of ``data_dir``, where that run is not)."""
    if stack_dir.resolve() == data_dir.resolve():  # the stack holds its data dir resolved
        return f"see one run's timeline: streamagent show {run_id}  (while `streamagent up` runs)"
    env = f"{ENV_PREFIX}DATA_DIR={shlex.quote(str(stack_dir))}"
    return (
        f"see one run's timeline: {env} streamagent show {run_id}"
        f"  (while `{env} streamagent up` runs: the demo's own stack)"
    )


def run_demo(settings: Settings, runs: int, timeout_s: float, report: Callable[[str], None] | None = None) -> int:
    from streamagent.console.devstack.stack import stack_tools
    from streamagent.console.tables import print_runs_table, steps_per_workflow

    print(
        "starting the embedded stack (Kafka broker, PostgreSQL, SaaS sandbox, 5 processors,"
        f" tools: {', '.join(stack_tools(settings))})…",
        flush=True,
    )
    started = time.monotonic()
    stack = start_own_stack(settings, report)
    with contextlib.closing(stack):  # started already: stop it however the demo ends
        s = stack.settings
        print(f"  kafka {s.bootstrap_servers} | postgres {s.database_url} | sandbox {s.sandbox_url}")
        print(f"  stack up in {time.monotonic() - started:.1f}s; logs in {s.data_dir / 'logs'}")
        requests = sample_requests(runs)
        submitted = time.monotonic()
        run_ids = produce_requests(s, requests)
        print(f"submitted {len(run_ids)} onboarding requests to {s.topic('agent.run.requests')}", flush=True)
        try:
            rows = wait_for_runs(s, run_ids, timeout_s, progress=True, stuck=stack.failing)
        except NoProgress as exc:
            print(f"demo FAILED, no run can finish: {exc}", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - submitted
        print()
        print_runs_table(rows, steps_per_workflow(s))
        completed = sum(1 for r in rows if r.status == "completed")
        print(f"\n{completed}/{len(run_ids)} runs completed in {elapsed:.1f}s")
        drafted = drafts_line(drafts(s, run_ids))
        if drafted:
            print(drafted)
        if rows:
            print(timeline_hint(rows[0].run_id, s.data_dir, settings.data_dir))
    ok = completed == len(run_ids)
    if not ok:
        print("demo FAILED: not every run completed", file=sys.stderr)
    return 0 if ok else 1
