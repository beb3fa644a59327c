"""The catalogue a decision replay re-decides with (no broker): the registry as of each decision, what
it cannot know once compacted, where it contradicts what a decision recorded, and the live gating
(decider, then guard) run over it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streamagent.processors.decision.gating import catalogue_inputs, decide
from streamagent.processors.guard.stage import GuardStage
from streamagent.tools.crm import Crm
from streamagent.tools.email import Email
from streamagent.tools.enrich import Enrich

from streamagent.config import Settings
from streamagent.console.replay.decisions import candidate_decider
from streamagent.console.replay.registry import Record, RegistryHistory, saw_otherwise
from streamagent.console.replay.snapshots import woken_from
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    OnboardingRequest,
    RunStatus,
    StateSnapshot,
    StepState,
    StepStatus,
    stable_id,
)

LEASE = 15_000
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WORKFLOWS = Path(__file__).resolve().parents[3] / "workflows"


def ms(seconds: float) -> int:
    return int(T0.timestamp() * 1000 + seconds * 1000)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def record(tool: type[Any], seconds: float, offset: int, *, state: str = "up", partition: int = 0) -> Record:
    """A registry record of ``tool``'s one member, sent ``seconds`` after T0."""
    a = tool.declaration(
        member_id=f"m-{tool.name}", state=state, at_ms=ms(seconds), started_at_ms=ms(0), lease_ms=LEASE
    )
    return Record(ms(seconds), partition, offset, a.key(), a.encode())


def test_the_catalogue_as_of_a_moment_folds_only_what_was_announced_by_then() -> None:
    history = RegistryHistory([record(Enrich, 1, 0), record(Crm, 10, 1), record(Crm, 20, 2, state="left")], LEASE)
    history.move_to(at(5))
    assert history.entry_of("enrich") is not None and history.entry_of("crm") is None  # crm not deployed yet
    history.move_to(at(12))
    assert history.entry_of("crm") is not None
    history.move_to(at(25))
    assert history.entry_of("crm") is None  # it left
    assert history.entry_of("enrich") is None  # no heartbeat since 1 s: its lease lapsed at 16 s
    history.move_to(at(12))  # back in time: folded again from the start
    assert history.entry_of("crm") is not None and history.entry_of("enrich") is not None
    assert history.unknown_at(at(25)) is None  # offsets 0, 1, 2: nothing missing


def test_a_compacted_registry_is_known_exactly_only_before_its_first_gap() -> None:
    # Offset 2 was compacted away (a later record of its key survives): what it said came after 10 s.
    history = RegistryHistory([record(Enrich, 1, 0), record(Crm, 10, 1), record(Crm, 30, 3)], LEASE)
    assert history.unknown_at(at(9)) is None
    why = history.unknown_at(at(10))
    assert why is not None and "compacted" in why and "2026-12-01T12:00:10" in why
    # A partition that no longer starts at offset 0 lost records of any time.
    gone = RegistryHistory([record(Enrich, 1, 0), record(Crm, 10, 5, partition=1)], LEASE)
    assert "oldest records are gone" in (gone.unknown_at(at(0)) or "")


def decision(action: DecisionAction, *, tool: str | None = None, seen: list[str], version: int = 3) -> DecisionRecorded:
    return DecisionRecorded(
        run_id="run-1",
        causation_id="e",
        decision_id="d",
        based_on_version=version,
        action=action,
        step=tool,
        tool=tool,
        reason="r",
        decider="rules",
        context={"available_tools": seen},
    )


def test_a_catalogue_that_contradicts_what_the_decision_saw_is_named() -> None:
    history = RegistryHistory([record(Enrich, 1, 0)], LEASE)
    history.move_to(at(2))
    fine = decision(DecisionAction.wait, tool="crm", seen=["enrich"])
    assert saw_otherwise(fine, history.entry_of) is None
    saw_crm = decision(DecisionAction.dispatch, tool="crm", seen=["crm", "enrich"])
    assert "saw crm available" in (saw_otherwise(saw_crm, history.entry_of) or "")
    waited = decision(DecisionAction.wait, tool="enrich", seen=[])
    assert "waited for enrich" in (saw_otherwise(waited, history.entry_of) or "")


def test_a_decision_made_on_waking_names_the_wait_it_was_woken_from() -> None:
    woken = decision(DecisionAction.dispatch, tool="crm", seen=["crm"], version=4)
    woken = woken.model_copy(update={"causation_id": stable_id("run-1", "decision", "3")})
    assert woken_from(woken) == ("run-1", 3)
    assert woken_from(decision(DecisionAction.dispatch, tool="crm", seen=["crm"], version=4)) is None


def snapshot(workflow: str, done: dict[str, dict[str, Any]], steps: list[str], contact: str) -> StateSnapshot:
    request = OnboardingRequest(
        company_name="Acme",
        company_domain="acme.io",
        contact_name="Ada Lovelace",
        contact_email=contact,
        goal="g",
        requested_by="t",
        workflow=workflow,
    )
    states = [
        StepState(name=n, status=StepStatus.succeeded, output=done[n]) if n in done else StepState(name=n)
        for n in steps
    ]
    return StateSnapshot(
        run_id="run-1",
        version=3,
        status=RunStatus.running,
        request=request,
        steps=states,
        created_at=T0,
        updated_at=T0,
        deadline_at=T0 + timedelta(hours=1),
        last_event_id="e",
    )


def test_the_live_gating_over_the_catalogue_as_of_then_waits_for_a_missing_tool_and_holds_a_declared_one(
    tmp_path: Path,
) -> None:
    settings = Settings(workflows_dir=WORKFLOWS, policies_dir=tmp_path)
    history = RegistryHistory([record(Enrich, 1, 0), record(Crm, 10, 1)], LEASE)
    inputs = catalogue_inputs(history.entry_of)
    decider = candidate_decider(settings, "rules", inputs)
    guard = GuardStage(settings, inputs.declared_approval)
    enriched = {"enrich": {"industry": "Media", "employees": 10, "country": "CA"}}
    snap = snapshot("onboarding-with-crm", enriched, ["enrich", "crm", "jira", "email", "slack"], "ada@acme.io")

    history.move_to(at(5))  # before crm was deployed
    _, verdict = decide(decider, guard, snap, at(5))
    assert verdict is not None and (verdict.decision.action, verdict.decision.tool) == (DecisionAction.wait, "crm")
    history.move_to(at(11))
    _, verdict = decide(decider, guard, snap, at(11))
    assert verdict is not None and (verdict.decision.action, verdict.decision.tool) == (DecisionAction.dispatch, "crm")

    # A tool that declares every call needs approval (its registry entry, no policy rule): held.
    class Guarded(Email):
        requires_approval = True

    mail = RegistryHistory([record(Enrich, 1, 0), record(Guarded, 1, 1), record(Email, 20, 2)], LEASE)
    inputs = catalogue_inputs(mail.entry_of)
    decider, guard = candidate_decider(settings, "rules", inputs), GuardStage(settings, inputs.declared_approval)
    jira = {"key": "ACME", "id": "1", "url": "u"}
    drafted = {"subject": "Welcome", "body": "Hello Ada", "drafted_by": "template"}
    done = {**enriched, "jira": jira, "draft": drafted}
    snap = snapshot("onboarding", done, ["enrich", "jira", "draft", "email", "slack"], "ada@acme.io")
    mail.move_to(at(5))
    _, verdict = decide(decider, guard, snap, at(5))
    assert verdict is not None and verdict.outcome == "approval" and verdict.decision.action is DecisionAction.wait
    mail.move_to(at(21))  # a version that declares nothing took over
    _, verdict = decide(decider, guard, snap, at(21))
    assert verdict is not None and verdict.outcome == "allowed" and verdict.decision.action is DecisionAction.dispatch
