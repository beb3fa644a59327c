"""Child workflows on the real stack (issue 22, item 3): a step that names a workflow starts a child run.

One stack for the module (real broker, real PostgreSQL, every process its own OS process) with the
repository's ``onboarding-kyc`` (enrich, then a KYC child run beside CRM and Jira, then email and Slack)
and its child ``kyc-check``, plus a variant whose welcome mail fails for good while the child still runs
(the parent escalates and ends the child). Figures worth quoting are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from collections.abc import Iterator

import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Producer
from helpers import ended, eventually, numbered_request
from streamagent.processors.projection import queries
from streamagent.tools.sandbox import FaultSpec, SandboxClient

from streamagent import codec
from streamagent.authn import INTAKE, issue
from streamagent.config import DEFAULT_WORKFLOWS_DIR, Settings, get_settings, to_env
from streamagent.console.cli import main as cli
from streamagent.console.devstack.stack import Stack
from streamagent.dlq_ops import read_dead_letters
from streamagent.events import RunCancelRequested, RunRequested, new_id
from streamagent.signing import load_keys
from streamagent.submit import produce_requests
from streamagent.topics import RUN_EVENTS

pytestmark = pytest.mark.integration

APIS = ("enrich", "crm", "jira", "email", "slack")
PARENT = "onboarding-kyc"
ADMITTED = 4  # the stack's STREAMAGENT_MAX_RUNNING_RUNS

# The welcome mail goes out beside the KYC child (not after it) and escalates when it bounces: the parent
# ends while its child is still running.
ESCALATING = """
name = "kyc-escalate"
goal = "a KYC child beside a welcome mail that may bounce"
tools = ["enrich", "email"]
max_parallel = 2
on_branch_failure = "stop"

[[steps]]
name = "enrich"
tool = "enrich"
args.domain = "{request.company_domain}"

[[steps]]
name = "kyc"
workflow = "kyc-check"
needs = ["enrich"]

[[steps]]
name = "mail"
tool = "email"
needs = ["enrich"]
on_failure = "escalate"
args.to = "{request.contact_email}"
args.subject = "Welcome"
args.body = "Hello"
"""


def request(n: int, workflow: str = PARENT, contact_email: str | None = None) -> RunRequested:
    return numbered_request(workflow, n, "Kestrel", "Kim Kay", "child-test", contact_email)


@pytest.fixture(scope="module")
def stack(module_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    flows = tmp_path_factory.mktemp("workflows")
    for name in ("onboarding", "kyc-check", PARENT):
        shutil.copy(DEFAULT_WORKFLOWS_DIR / f"{name}.toml", flows / f"{name}.toml")
    (flows / "kyc-escalate.toml").write_text(ESCALATING)
    # One place per partition in the running-runs bound (4 partitions): a child run is admitted outside it.
    update = {"workflows_dir": flows, "stack_tools": ",".join(APIS), "max_running_runs": ADMITTED}
    settings = module_settings.model_copy(update=update)
    with Stack(settings, restart_backoff_s=0.1, max_backoff_s=0.5) as running:
        SandboxClient(running.settings.sandbox_url).wait_ready()
        yield running


@pytest.fixture(autouse=True)
def sandbox(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[SandboxClient]:
    # The CLI (show, replay) reads the stack's settings from the environment, as a user's shell would.
    for key, value in to_env(stack.settings).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    client = SandboxClient(stack.settings.sandbox_url)
    client.clear_faults()
    yield client
    client.clear_faults()
    get_settings.cache_clear()


def children_of(s: Settings, run_ids: list[str]) -> dict[str, list[queries.RunRow]]:
    return {run_id: queries.children(s, run_id) for run_id in run_ids}


def family_ended(s: Settings, run_ids: list[str]) -> dict[str, list[queries.RunRow]] | None:
    """Every parent and each of its children ended (the children as the projection has them), else None."""
    if ended(s, run_ids) is None:
        return None
    kids = children_of(s, run_ids)
    if any(not rows or any(r.status == "running" for r in rows) for rows in kids.values()):
        return None
    return kids


def effects_once(sandbox: SandboxClient, run_ids: set[str]) -> Counter[tuple[str | None, str]]:
    """Performed effects per (run, api); each (run, api, idempotency key) at most once."""
    mine = [e for e in sandbox.effects() if e.run_id in run_ids]
    keyed = Counter((e.run_id, e.api, e.idempotency_key) for e in mine)
    assert {k: n for k, n in keyed.items() if n > 1} == {}, "an effect was performed twice"
    return Counter((e.run_id, e.api) for e in mine)


def busy(timeline: list[queries.TimelineEntry]) -> float:
    """Seconds from a run's first decision to its last event."""
    first = next(e.occurred_at for e in timeline if e.type == "DecisionRecorded")
    return (timeline[-1].occurred_at - first).total_seconds()


def show(capsys: pytest.CaptureFixture[str], run_id: str) -> str:
    capsys.readouterr()
    assert cli(["show", run_id]) == 0
    return capsys.readouterr().out


def test_a_parent_with_a_child_run_completes_and_both_timelines_link(
    stack: Stack, sandbox: SandboxClient, capsys: pytest.CaptureFixture[str]
) -> None:
    s = stack.settings
    run_ids = produce_requests(s, [request(n) for n in range(2)])
    # As a user would: `submit --workflow onboarding-kyc --wait`.
    submitted = new_id()
    flags = {"company-name": "Kestrel 2", "company-domain": "kestrel2.io", "contact-name": "Kim Kay"}
    flags |= {"contact-email": "kim@kestrel2.io", "requested-by": "child-test", "run-id": submitted}
    argv = ["submit", "--workflow", PARENT, *(x for k, v in flags.items() for x in (f"--{k}", v)), "--wait"]
    assert cli(argv) == 0, capsys.readouterr()
    run_ids.append(submitted)
    kids = eventually(lambda: family_ended(s, run_ids), timeout=120, what="3 parents and their children ended")
    rows = {r.run_id: r for r in ended(s, run_ids) or []}
    assert Counter(r.status for r in rows.values()) == {"completed": 3}, [(r.run_id, r.reason) for r in rows.values()]
    for parent, (child,) in kids.items():
        # The projection links both ways; the child ran the child workflow and completed.
        assert (child.parent_run_id, child.parent_step, child.workflow, child.status) == (
            parent,
            "kyc",
            "kyc-check",
            "completed",
        )
        timeline = queries.timeline(s, parent)
        answer = next(e for e in timeline if e.type == "ToolResult" and e.step == "kyc")
        assert answer.payload["tool"] == "workflow:kyc-check" and answer.payload["status"] == "succeeded"
        assert answer.payload["output"]["child_run_id"] == child.run_id and "lookup" in answer.payload["output"]
        assert answer.payload["tool_calls"] == 2  # the child's enrich and slack count as the parent's
        first = queries.timeline(s, child.run_id)[0]
        assert first.type == "RunRequested" and f"child run of {parent} (step kyc)" in first.summary
        # `show` prints the link both ways.
        assert f"children:\n  {child.run_id}  step kyc  kyc-check  status=completed" in show(capsys, parent)
        assert f"child of {parent} (step kyc)" in show(capsys, child.run_id)
    # From the first decision (the stack's first runs wait for its processors to start) to the end.
    took = sorted(busy(queries.timeline(s, r)) for r in run_ids)
    kid_took = sorted(busy(queries.timeline(s, c.run_id)) for rows in kids.values() for c in rows)
    figures = f"parents {', '.join(f'{t:.2f}' for t in took)} s;"
    figures += f" their KYC children {', '.join(f'{t:.2f}' for t in kid_took)} s"
    capsys.readouterr()
    assert cli(["runs"]) == 0
    listed = capsys.readouterr().out
    assert all(f"↳ child of {parent} (step kyc)" in listed for parent in run_ids)
    # Each effect once: the parent's five, the child's two (its own run id).
    per = effects_once(sandbox, set(run_ids) | {c.run_id for rows in kids.values() for c in rows})
    for parent, (child,) in kids.items():
        assert {api: per[(parent, api)] for api in APIS} == dict.fromkeys(APIS, 1)
        assert (per[(child.run_id, "enrich")], per[(child.run_id, "slack")]) == (1, 1)
    with capsys.disabled():
        print(f"\n[child runs] 3 onboarding-kyc runs, first decision to end: {figures}")


def test_more_parents_than_places_all_complete_their_children_admitted_outside_the_bound(stack: Stack) -> None:
    """Twice as many parents as the bound has places, each with a KYC child: every place is held by a parent
    whose child must run for it to end. Children waiting for a place (as before) stalled this until the
    runs' deadlines; admitted outside the bound, all complete."""
    s = stack.settings
    assert s.max_running_runs == ADMITTED
    run_ids = produce_requests(s, [request(500 + n) for n in range(2 * ADMITTED)])
    kids = eventually(lambda: family_ended(s, run_ids), timeout=180, what="8 parents and their children ended")
    rows = ended(s, run_ids) or []
    assert Counter(r.status for r in rows) == {"completed": 2 * ADMITTED}, [(r.run_id, r.reason) for r in rows]
    assert all(len(rows) == 1 and rows[0].status == "completed" for rows in kids.values()), kids
    took = max((r.ended_at - r.created_at).total_seconds() for r in rows if r.ended_at and r.created_at)
    print(
        f"\n[child admission] {2 * ADMITTED} parents, {ADMITTED} places: all done with their children,"
        f" slowest {took:.2f} s from request to end"
    )


def _on_distinct_partitions(s: Settings, first: int, count: int) -> list[RunRequested]:
    """``count`` requests whose runs have distinct home partitions. The bound has one place per partition:
    runs that share one run one after the other, so four parents drawn at random all landed on one partition
    about once in 64 tries, and never had two children running at once."""
    partitioner, every = DefaultPartitioner(), list(range(s.partitions))
    chosen: dict[int, RunRequested] = {}
    n = first
    while len(chosen) < count:
        candidate = request(n)
        chosen.setdefault(int(partitioner(candidate.run_id.encode(), every, every)), candidate)
        n += 1
    return list(chosen.values())


def test_kill_nine_of_the_state_processor_mid_child_changes_nothing(stack: Stack, sandbox: SandboxClient) -> None:
    s = stack.settings
    sandbox.set_faults("slack", FaultSpec(latency_ms=1500))  # the child's second step is slow
    run_ids = produce_requests(s, _on_distinct_partitions(s, 100, 4))

    def children_running() -> bool:
        kids = children_of(s, run_ids)
        return sum(1 for rows in kids.values() for r in rows if r.status == "running") >= 2

    eventually(children_running, timeout=60, interval=0.05, what="child runs under way")
    child = stack.children["processor-state"]
    old = stack.kill("processor-state", signal.SIGKILL)
    eventually(lambda: child.pid not in (None, old) and child.alive(), timeout=30, interval=0.05, what="restart")
    kids = eventually(lambda: family_ended(s, run_ids), timeout=180, what="4 parents and their children ended")
    rows = ended(s, run_ids) or []
    assert Counter(r.status for r in rows) == {"completed": 4}, [(r.run_id, r.reason) for r in rows]
    assert all(len(rows) == 1 and rows[0].status == "completed" for rows in kids.values()), kids
    everyone = set(run_ids) | {c.run_id for rows in kids.values() for c in rows}
    per = effects_once(sandbox, everyone)
    assert all(per[(parent, api)] == 1 for parent in run_ids for api in APIS)
    assert all(per[(c.run_id, "slack")] == 1 for rows in kids.values() for c in rows)
    # The parent's step was answered exactly once (one result event for it in the projection).
    for parent in run_ids:
        answers = [e for e in queries.timeline(s, parent) if e.type == "ToolResult" and e.step == "kyc"]
        assert len(answers) == 1, answers
    print(
        f"\n[child kill -9] state processor killed mid-child: 4 parents, 4 children completed,"
        f" {sum(per.values())} effects, 0 twice"
    )


def test_a_parent_that_escalates_ends_its_live_child(stack: Stack, sandbox: SandboxClient) -> None:
    s = stack.settings
    sandbox.set_faults("slack", FaultSpec(latency_ms=4000))  # the child is still filing when the mail bounces
    (run_id,) = produce_requests(s, [request(200, "kyc-escalate", contact_email="bounce@kestrel200.io")])
    kids = eventually(lambda: family_ended(s, [run_id]), timeout=120, what="the parent and its child ended")
    (parent,) = ended(s, [run_id]) or []
    assert parent.status == "escalated" and "mail" in (parent.reason or ""), parent
    (child,) = kids[run_id]
    assert child.status == "failed", child
    assert (child.reason or "").startswith(f"parent run {run_id} ended (escalated)"), child.reason
    # The parent's step takes the child's end as its result (failed), after the parent ended.
    answer = eventually(
        lambda: next((e for e in queries.timeline(s, run_id) if e.type == "ToolResult" and e.step == "kyc"), None),
        timeout=30,
        what="the child's answer",
    )
    assert answer.payload["status"] == "failed" and "parent run" in answer.payload["error"]


def test_an_operator_cancel_ends_the_parent_and_its_child_and_nothing_starts_after_it(
    stack: Stack, sandbox: SandboxClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`streamagent cancel` of a parent whose KYC child is filing (a slow Slack call in flight): both end
    cancelled, "cancelled by ...", the child's call in flight lands, no further step of either starts, the
    parent's Jira project is undone (compensate_abandoned), and replay rebuilds both identical."""
    s = stack.settings
    sandbox.set_faults("slack", FaultSpec(latency_ms=3000))
    (run_id,) = produce_requests(s, [request(600)])

    def filing() -> queries.RunRow | None:
        kids = queries.children(s, run_id)
        timeline = queries.timeline(s, kids[0].run_id) if kids else []
        sent = any(e.type == "DecisionRecorded" and e.step == "file" for e in timeline)
        return kids[0] if sent else None

    child = eventually(filing, timeout=60, interval=0.05, what="the child's Slack call in flight")
    capsys.readouterr()
    assert cli(["cancel", run_id, "--reason", "the client withdrew"]) == 0, capsys.readouterr()
    said = capsys.readouterr().out
    assert f"cancel of run {run_id} requested as" in said and "the client withdrew" in said
    before = {(e.run_id, e.api, e.op) for e in sandbox.effects() if e.run_id in (run_id, child.run_id)}
    kids = eventually(lambda: family_ended(s, [run_id]), timeout=60, what="the parent and its child ended")
    (parent,) = ended(s, [run_id]) or []
    (ended_child,) = kids[run_id]
    # Cancelled is a status of its own (not failed), for the parent and the child it takes with it.
    assert parent.status == "cancelled" and (parent.reason or "").startswith("cancelled by "), parent
    assert (parent.reason or "").endswith(": the client withdrew")
    assert ended_child.status == "cancelled" and f"parent run {run_id} ended (cancelled): cancelled by" in (
        ended_child.reason or ""
    )
    # The child's Slack call lands (it was in flight), the parent's Jira project is undone; nothing else.
    eventually(
        lambda: (
            {(e.api, e.op) for e in sandbox.effects(run_id=run_id)} - {(a, o) for r, a, o in before if r == run_id}
            or None
        ),
        timeout=60,
        what="the parent's undo",
    )
    eventually(lambda: sandbox.effects(api="slack", run_id=child.run_id) or None, timeout=30, what="the filing")
    per = effects_once(sandbox, {run_id, child.run_id})
    assert per[(run_id, "email")] == per[(run_id, "slack")] == 0  # no step after the cancel
    after = {(e.api, e.op) for e in sandbox.effects(run_id=run_id)} - {(a, o) for r, a, o in before if r == run_id}
    assert {api for api, _ in after} == {"jira"}, after  # the undo only
    shown = show(capsys, run_id)
    assert "cancel requested: cancelled by" in shown and "the client withdrew" in shown
    # An ended run, or an unknown one: one line, exit 2.
    assert cli(["cancel", run_id]) == 2
    assert "has already ended (cancelled)" in capsys.readouterr().err
    assert cli(["cancel", new_id()]) == 2
    assert "no run" in capsys.readouterr().err
    assert cli(["replay", "--runs", f"{run_id},{child.run_id}", "--json"]) == 0, capsys.readouterr()
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (figures["runs"], figures["differ"]) == (2, 0), figures
    # Listed and counted under their own status.
    assert cli(["runs", "--status", "cancelled", "--json"]) == 0
    listed = {row["run_id"] for row in json.loads(capsys.readouterr().out)}
    assert {run_id, child.run_id} <= listed


def test_replay_rebuilds_parents_and_children_identical(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    s = stack.settings
    run_ids = produce_requests(s, [request(300 + n) for n in range(2)])
    kids = eventually(lambda: family_ended(s, run_ids), timeout=120, what="2 parents and their children ended")
    capsys.readouterr()
    assert cli(["replay", "--json"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["differ"] == 0, out
    assert figures["runs"] >= len(run_ids) + sum(len(rows) for rows in kids.values()), out
    print(f"\n[child replay] {figures['runs']} runs (parents and children) rebuilt, {figures['differ']} differ")


def test_a_forged_child_request_or_cancel_is_dead_lettered_unauthenticated(stack: Stack) -> None:
    s = stack.settings
    forged: list[tuple[RunRequested | RunCancelRequested, list[tuple[str, bytes]] | None]] = []
    intake = issue(load_keys(s), INTAKE)
    for signer in (None, intake):  # unsigned, and signed by intake (whose requests may not carry a parent)
        child = request(400).model_copy(
            update={"parent_run_id": new_id(), "parent_step": "kyc", "parent_command_id": new_id()}
        )
        value = codec.encode(child)
        forged.append((child, signer.headers(value) if signer is not None else None))
    # A cancel only an operator's key writes, under its own name: signed as intake, or by another operator.
    cancel = RunCancelRequested(run_id=new_id(), by="grace", reason="forged")
    for role in (INTAKE, "operator:mallory"):
        value = codec.encode(cancel.model_copy(update={"event_id": new_id()}))
        forged.append((codec.decode(value), issue(load_keys(s), role).headers(value)))  # type: ignore[arg-type]
    producer = Producer({"bootstrap.servers": s.bootstrap_servers, "partitioner": "murmur2_random"})
    for child, headers in forged:
        producer.produce(s.topic(RUN_EVENTS), key=child.run_id.encode(), value=codec.encode(child), headers=headers)
    assert producer.flush(10) == 0
    wanted = {child.event_id for child, _ in forged}

    def refused() -> dict[str, set[str]] | None:
        by_event: dict[str, set[str]] = {}
        for letter in read_dead_letters(s, reason="unauthenticated"):
            event = codec.decode(letter.value)
            if event.event_id in wanted:  # type: ignore[attr-defined]
                by_event.setdefault(event.event_id, set()).add(letter.processor)  # type: ignore[attr-defined]
        return (
            by_event
            if set(by_event) == wanted and all({"state", "projection"} <= p for p in by_event.values())
            else None
        )

    eventually(refused, timeout=60, interval=0.3, what="the forged child requests and cancels refused")
    # Neither started a run: nothing of them was folded or projected.
    assert all(queries.run(s, child.run_id) is None for child, _ in forged)
