"""Fan-out and fan-in on the real stack (issue 22): steps that do not need each other run at once.

One stack for the module (real broker, real PostgreSQL, every process its own OS process), with test
workflows of two independent branches of two steps each, and a scripted model for the one the model
decides. Figures worth quoting are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
from helpers import ended, eventually, numbered_request, read_topic
from streamagent.processors.projection import queries
from streamagent.processors.workflow import project_key
from streamagent.tools.sandbox import FaultSpec, SandboxClient
from streamagent.tools.sandbox.model import Answer, FakeModel

from streamagent import codec
from streamagent.config import DEFAULT_WORKFLOWS_DIR, Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.devstack.stack import Stack
from streamagent.events import DecisionAction, DecisionRecorded, RunRequested, ToolCommand
from streamagent.submit import produce_requests
from streamagent.topics import command_topic

pytestmark = pytest.mark.integration

APIS = ("enrich", "jira", "email", "slack")

# Branch a: a jira project, then a mail; branch b: enrichment, then a second jira project. Nothing joins
# them, so a run's steps take the longer branch, not the sum.
BRANCHES = """
name = "{name}"
goal = "two independent branches of two steps each"
tools = ["enrich", "jira", "email", "slack"]
max_parallel = 2
on_branch_failure = "{on_branch_failure}"
{decider}

[[steps]]
name = "a1"
tool = "jira"
args.key = "{{request.company_name | run_key}}"
args.name = "{{request.company_name}} onboarding"
args.lead_email = "{{request.contact_email}}"
compensate.tool = "jira"
compensate.args.key = "{{steps.a1.output.key}}"

[[steps]]
name = "b1"
tool = "enrich"
args.domain = "{{request.company_domain}}"

[[steps]]
name = "a2"
tool = "email"
needs = ["a1"]
args.to = "{{request.contact_email}}"
args.subject = "Welcome"
args.body = "Jira project {{steps.a1.output.key}} is ready."

[[steps]]
name = "b2"
tool = "jira"
needs = ["b1"]
args.key = "{{request.contact_name | run_key}}"
args.name = "{{request.contact_name}} account"
args.lead_email = "{{request.contact_email}}"
compensate.tool = "jira"
compensate.args.key = "{{steps.b2.output.key}}"
"""
BRANCH_OF = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}


def request(workflow: str, n: int, contact_email: str | None = None) -> RunRequested:
    return numbered_request(workflow, n, "Northwind", "Zed Zulu", "test", contact_email)


@pytest.fixture(scope="module")
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


@pytest.fixture(scope="module")
def stack(module_settings: Settings, model: FakeModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    flows = tmp_path_factory.mktemp("workflows")
    shutil.copy(DEFAULT_WORKFLOWS_DIR / "onboarding.toml", flows / "onboarding.toml")
    for name, failure, decider in (
        ("branches", "finish", ""),
        ("branches-stop", "stop", ""),
        ("branches-llm", "finish", 'decider = "llm"\nfallback = "rules"'),
    ):
        (flows / f"{name}.toml").write_text(BRANCHES.format(name=name, on_branch_failure=failure, decider=decider))
    settings = module_settings.model_copy(
        update={
            "workflows_dir": flows,
            "stack_tools": ",".join(APIS),
            "openai_base_url": model.url,
            "model": "fake-model",
            "model_max_retries": 0,
        }
    )
    with Stack(settings) as running:
        SandboxClient(running.settings.sandbox_url).wait_ready()
        yield running


@pytest.fixture(autouse=True)
def healthy(stack: Stack) -> Iterator[SandboxClient]:
    sandbox = SandboxClient(stack.settings.sandbox_url)
    sandbox.clear_faults()
    yield sandbox
    sandbox.clear_faults()


def events_of(settings: Settings, run_id: str) -> list[tuple[str, datetime, dict[str, Any]]]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT type, occurred_at, payload FROM run_events WHERE run_id = %s ORDER BY occurred_at, event_id",
            (run_id,),
        ).fetchall()
    return [(t, at, p) for t, at, p in rows]


def step_times(settings: Settings, run_id: str) -> dict[str, tuple[datetime, datetime]]:
    """Each executed step's (dispatched, result) times: the decision that started it, its tool's result."""
    started: dict[str, datetime] = {}
    finished: dict[str, datetime] = {}
    for kind, at, payload in events_of(settings, run_id):
        if kind == "DecisionRecorded" and payload["action"] == "dispatch":
            for step in [payload["step"], *(p["step"] for p in payload.get("parallel") or [])]:
                started.setdefault(step, at)
        elif kind == "ToolResult" and payload["operation"] == "execute" and payload["status"] == "succeeded":
            finished.setdefault(payload["step"], at)
    return {s: (started[s], finished[s]) for s in finished if s in started}


def figures(settings: Settings, run_id: str) -> tuple[float, float, float]:
    """(makespan, longest branch, sum of steps) in seconds: the makespan from the first step's dispatch to
    the last step's result; a branch is the sum of its steps' dispatch-to-result times."""
    times = step_times(settings, run_id)
    assert set(times) == set(BRANCH_OF), times
    took = {s: (end - start).total_seconds() for s, (start, end) in times.items()}
    makespan = (max(e for _, e in times.values()) - min(s for s, _ in times.values())).total_seconds()
    branches = Counter[str]()
    for step, seconds in took.items():
        branches[BRANCH_OF[step]] += seconds
    return makespan, max(branches.values()), sum(took.values())


def effects_by_key(sandbox: SandboxClient, run_ids: list[str]) -> Counter[tuple[str, str, str]]:
    """Performed effects per (run, api, idempotency key = command id)."""
    wanted = set(run_ids)
    return Counter((e.run_id, e.api, e.idempotency_key or "") for e in sandbox.effects() if e.run_id in wanted)


def commands_of(settings: Settings, tool: str, run_ids: set[str]) -> list[tuple[ToolCommand, float]]:
    """The commands on a tool's topic for ``run_ids``, with the time each was written (seconds)."""
    out = []
    for message in read_topic(settings, settings.topic(command_topic(tool))):
        command = codec.decode(message.value())
        if isinstance(command, ToolCommand) and command.run_id in run_ids:
            out.append((command, message.timestamp()[1] / 1000))
    return out


def test_two_branches_run_at_once_in_the_time_of_the_longer(stack: Stack, healthy: SandboxClient) -> None:
    s = stack.settings
    for api in APIS:
        healthy.set_faults(api, FaultSpec(latency_ms=300))
    run_ids = produce_requests(s, [request("branches", n) for n in range(4)])
    rows = eventually(lambda: ended(s, run_ids), timeout=120, what="4 fan-out runs ended")
    assert Counter(r.status for r in rows) == {"completed": 4}, [(r.run_id, r.reason) for r in rows]

    # Each run's first decision started both branches: one DecisionRecorded, one command each.
    for run_id in run_ids:
        first = next(p for k, _, p in events_of(s, run_id) if k == "DecisionRecorded" and p["action"] == "dispatch")
        assert [first["step"], *(p["step"] for p in first["parallel"])] == ["a1", "b1"]
        assert first["command_partition"] is not None and first["parallel"][0]["command_offset"] is not None
    # Both branches' commands were on their topics before either branch's first result returned.
    wanted = set(run_ids)
    written = {(c.run_id, c.step): at for c, at in commands_of(s, "jira", wanted) + commands_of(s, "enrich", wanted)}
    for run_id in run_ids:
        results = step_times(s, run_id)
        first_result = min(results["a1"][1], results["b1"][1]).timestamp()
        assert max(written[(run_id, "a1")], written[(run_id, "b1")]) < first_result

    measured = [figures(s, run_id) for run_id in run_ids]
    ratios = [makespan / longest for makespan, longest, _ in measured]
    med = [statistics.median(column) for column in zip(*measured, strict=True)]
    print(
        f"\n[fan-out] 4 runs, 300 ms tools: makespan p50 {med[0]:.3f}s, longest branch p50 {med[1]:.3f}s,"
        f" sum of steps p50 {med[2]:.3f}s, makespan/longest p50 {statistics.median(ratios):.3f}"
        f" (max {max(ratios):.3f})"
    )
    # Every run well under the sum: the branches overlapped. The bound (1.15x the longest branch)
    # is a figure, printed above and measured by bench/parallel.py: the suite's other worker loads the
    # machine (1.05-1.08 alone, 1.21-1.28 in a full clean-clone run on 2 cores, 2026-12-07), so the test
    # asserts the overlap, with room: a sequential run would be about 2x its longest branch here.
    assert statistics.median(ratios) <= 1.5, measured
    assert all(makespan < 0.8 * total for makespan, _, total in measured), measured
    # Each effect once: a jira project per branch, one mail, one enrichment.
    per = effects_by_key(healthy, run_ids)
    assert all(n == 1 for n in per.values()), [k for k, n in per.items() if n > 1]
    assert Counter(api for _, api, _ in per) == {"jira": 8, "email": 4, "enrich": 4}


def test_kill_nine_of_the_decision_processor_and_a_tool_mid_branches_repeats_no_effect(
    stack: Stack, healthy: SandboxClient
) -> None:
    s = stack.settings
    for api in APIS:
        healthy.set_faults(api, FaultSpec(latency_ms=300))
    run_ids = produce_requests(s, [request("branches", 100 + n) for n in range(8)])

    def in_flight() -> bool:
        results = Counter(e.api for e in healthy.effects() if e.run_id in set(run_ids))
        return results["jira"] >= 2  # branches under way, most steps still ahead

    eventually(in_flight, timeout=60, interval=0.05, what="branches under way")
    killed = stack.kill("processor-decision")
    eventually(lambda: stack.children["tool-jira"].alive(), timeout=30, what="jira alive")
    killed_tool = stack.kill("tool-jira")
    for name, old in (("processor-decision", killed), ("tool-jira", killed_tool)):
        eventually(
            lambda name=name, old=old: stack.children[name].pid not in (None, old) and stack.children[name].alive(),
            timeout=60,
            what=f"{name} restarted",
        )
    rows = eventually(lambda: ended(s, run_ids), timeout=180, what="8 runs ended after the kills")
    assert Counter(r.status for r in rows) == {"completed": 8}, [(r.run_id, r.reason) for r in rows]
    per = effects_by_key(healthy, run_ids)
    duplicated = {k: n for k, n in per.items() if n > 1}
    assert not duplicated, duplicated
    assert Counter(api for _, api, _ in per) == {"jira": 16, "email": 8, "enrich": 8}
    print(f"\n[fan-out kill -9] 8 runs, decision processor and jira killed mid-branches: {len(per)} effects, 0 twice")


def jira_ops(sandbox: SandboxClient, run_id: str) -> Counter[str]:
    return Counter(e.op for e in sandbox.effects("jira", run_id))


def test_a_failed_branch_stop_starts_nothing_further_finish_lets_the_other_end_then_both_are_undone(
    stack: Stack, healthy: SandboxClient
) -> None:
    s = stack.settings
    # Branch a fails at once (the mailbox rejects its mail for good) while branch b's enrichment is slow.
    healthy.set_faults("enrich", FaultSpec(latency_ms=1500))
    stop = request("branches-stop", 200, contact_email="bounce@northwind200.io")
    finish = request("branches", 201, contact_email="bounce@northwind201.io")
    run_ids = produce_requests(s, [stop, finish])
    rows = {r.run_id: r for r in eventually(lambda: ended(s, run_ids), timeout=120, what="both runs ended")}
    assert rows[stop.run_id].status == rows[finish.run_id].status == "failed"
    assert rows[stop.run_id].failed_step == rows[finish.run_id].failed_step == "a2"

    # stop: b2 never started (no command, no effect); a1, the one undoable step that succeeded, is undone.
    def undone(run_id: str, count: int) -> list[tuple[str, datetime]] | None:
        seen = [
            (p["step"], at)
            for k, at, p in events_of(s, run_id)
            if k == "ToolResult" and p["operation"] == "compensate" and p["status"] == "succeeded"
        ]
        return seen if len(seen) >= count else None

    assert eventually(lambda: undone(stop.run_id, 1), timeout=60, what="stop run undone")[0][0] == "a1"
    stop_events = events_of(s, stop.run_id)
    assert not [p for k, _, p in stop_events if k == "ToolCommand" and p["step"] == "b2"]
    assert jira_ops(healthy, stop.run_id) == {"create": 1, "delete": 1}

    # finish: b2 started after a2 had failed and succeeded; then both jira projects were undone, b2's first.
    times = {p["step"]: at for k, at, p in events_of(s, finish.run_id) if k == "ToolResult"}
    assert times["b2"] > times["a2"]
    undos = eventually(lambda: undone(finish.run_id, 2), timeout=60, what="finish run undone")
    order = [step for step, _ in undos]
    assert order == ["b2", "a1"]
    assert jira_ops(healthy, finish.run_id) == {"create": 2, "delete": 2}
    print(f"\n[fan-out failure] stop: b2 never started, a1 undone; finish: b2 ran after a2 failed, undone {order}")


def _model_decisions(settings: Settings, run_id: str) -> list[DecisionRecorded]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT decision_event FROM decisions WHERE run_id = %s ORDER BY based_on_version", (run_id,)
        ).fetchall()
    out = [codec.decode(bytes(r[0])) for r in rows]
    return [d for d in out if isinstance(d, DecisionRecorded)]


def test_the_model_calls_two_tools_at_once_and_both_steps_run(stack: Stack, model: FakeModel) -> None:
    s = stack.settings
    req = request("branches-llm", 300)
    jira = {"key": project_key(req.company_name, req.run_id), "name": "Northwind", "lead_email": req.contact_email}
    model.script(Answer.calls(("jira", jira), ("enrich", {"domain": req.company_domain})))
    produce_requests(s, [req])
    rows = eventually(lambda: ended(s, [req.run_id]), timeout=90, what="the model's run ended")
    assert rows[0].status == "completed", rows[0].reason
    first = _model_decisions(s, req.run_id)[0]
    assert first.action is DecisionAction.dispatch and [d.step for d in first.dispatched()] == ["a1", "b1"]
    assert first.arguments == jira
    calls = first.context["answers"][0]["tool_calls"]  # the whole answer is recorded
    assert [c["function"]["name"] for c in calls] == ["jira", "enrich"]
    assert "call every ready step in one answer" in first.context["messages"][0]["content"]


def test_one_valid_and_one_invalid_call_the_valid_runs_and_the_other_is_repaired(
    stack: Stack, model: FakeModel
) -> None:
    s = stack.settings
    req = request("branches-llm", 301)
    jira = {"key": project_key(req.company_name, req.run_id), "name": "Northwind", "lead_email": req.contact_email}
    model.script(
        Answer.calls(("jira", jira), ("enrich", {"domain": 42, "extra": True})),  # the second fails the schema
        Answer.call("enrich", {"domain": req.company_domain}),  # the repair turn
    )
    produce_requests(s, [req])
    rows = eventually(lambda: ended(s, [req.run_id]), timeout=90, what="the model's run ended")
    assert rows[0].status == "completed", rows[0].reason
    first = _model_decisions(s, req.run_id)[0]
    assert [d.step for d in first.dispatched()] == ["a1", "b1"]
    assert first.arguments == jira and first.parallel[0].arguments == {"domain": req.company_domain}
    assert len(first.context["refused"]) == 1 and "enrich" in first.context["refused"][0]
    assert first.context["fallback"] is None and len(first.context["answers"]) == 2


def test_replay_rebuilds_the_fan_out_runs_and_re_decides_them_the_same(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every run of the module (fan-outs, the kills, the failed branches and their undos, the model's): the
    folded state rebuilt from the log is the live one; every decision of the rules is re-decided the same."""
    s = stack.settings
    for key, value in to_env(s).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    capsys.readouterr()
    assert cli(["replay", "--json"]) == 0, capsys.readouterr().out
    # The rules' runs (a model's decisions are re-decided by asking the model again: not this test's).
    ruled = [r.run_id for r in queries.runs(s, limit=1000) if r.workflow in ("branches", "branches-stop")]
    capsys.readouterr()
    code = cli(["replay", "decisions", "--runs", ",".join(ruled), "--json"])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    counts = report["counts"]
    print(f"\n[fan-out replay] decisions: {counts}")
    assert code == 0 and report["differing"] == [], out
    assert counts["same"] == sum(counts.values()) >= 40, out

    # `show` names every step a decision started, and each step's command.
    one = next(r for r in queries.runs(s, limit=1000) if r.workflow == "branches" and r.status == "completed")
    capsys.readouterr()
    assert cli(["show", one.run_id]) == 0
    shown = capsys.readouterr().out
    assert "decided dispatch a1 + b1" in shown and "command execute → enrich" in shown, shown
