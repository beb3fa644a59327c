"""The guard's verdicts (pure): budgets, approvals held, granted, expired and denied, undos allowed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from streamagent.processors.decision.decider import Decision
from streamagent.processors.guard.judge import ALLOWED, APPROVAL, REFUSED, judge

from streamagent.approval import arguments_digest
from streamagent.events import (
    ApprovalState,
    ApprovalStatus,
    DecisionAction,
    OnboardingRequest,
    RunStatus,
    StateSnapshot,
    StepState,
)
from streamagent.policy import Policy, load_policy

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MAIL = {"to": "ada@elsewhere.net", "subject": "Welcome"}
POLICY = """
[budgets]
max_tool_calls = 4
max_steps = 10
max_tokens = 1000
max_cost_usd = 0.5
max_wall_time_s = 600

[workflows.onboarding.budgets]
max_tool_calls = 3

[approvals]
timeout_s = 3600

[[approvals.rules]]
tool = "email"
argument = "to"
not_matching = '@ok\\.example$'
reason = "email outside the allow-list"
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    (tmp_path / "p.toml").write_text(POLICY)
    return load_policy(tmp_path)


def snapshot(workflow: str = "other", **update: object) -> StateSnapshot:
    request = OnboardingRequest(
        company_name="Acme",
        company_domain="acme.io",
        contact_name="Ada",
        contact_email="ada@acme.io",
        goal="g",
        requested_by="t",
        workflow=workflow,
    )
    snap = StateSnapshot(
        run_id="run-1",
        version=5,
        status=RunStatus.running,
        request=request,
        steps=[StepState(name=n) for n in ("enrich", "jira", "email", "slack")],
        created_at=T0,
        updated_at=T0,
        deadline_at=T0 + timedelta(hours=1),
        last_event_id="e",
    )
    return snap.model_copy(update=update)


def mail(arguments: dict[str, str] | None = None, **extra: int | float) -> Decision:
    return Decision(DecisionAction.dispatch, "next", step="email", tool="email", arguments=arguments or MAIL, **extra)  # type: ignore[arg-type]


def verdict(snap: StateSnapshot, decision: Decision, policy: Policy, *, at: datetime = T0, declared: bool = False):  # type: ignore[no-untyped-def]
    return judge(snap, decision, policy, environment="dev", declared_approval=declared, now=at)


def test_a_command_within_budget_and_policy_is_allowed_with_the_policy_version(policy: Policy) -> None:
    v = verdict(snapshot(), mail({"to": "bob@ok.example"}), policy)
    assert (v.outcome, v.decision.action, v.policy_version) == (ALLOWED, DecisionAction.dispatch, policy.version)
    assert len(policy.version) == 12 and not v.approved


@pytest.mark.parametrize(
    ("update", "extra", "named"),
    [
        ({"tool_calls": 4}, {}, "max_tool_calls=4"),
        ({"decisions": 10}, {}, "max_steps=10"),
        ({"tokens": 900}, {"prompt_tokens": 80, "completion_tokens": 30}, "max_tokens=1000"),
        ({"cost_usd": 0.45}, {"cost_usd": 0.1}, "max_cost_usd=0.5"),
    ],
)
def test_a_decision_over_a_budget_is_refused_and_escalates_naming_it(
    policy: Policy, update: dict[str, object], extra: dict[str, float], named: str
) -> None:
    v = verdict(snapshot(**update), mail({"to": "bob@ok.example"}, **extra), policy)
    assert v.outcome == REFUSED and named in (v.reason or "")
    assert v.decision.action is DecisionAction.escalate and v.decision.reason == f"guard: {v.reason}"
    assert v.decision.context["proposed"]["tool"] == "email"  # what was refused stays in the audit


def test_the_workflow_budget_is_the_stricter_one_and_wall_time_counts_from_the_request(policy: Policy) -> None:
    assert verdict(snapshot("onboarding", tool_calls=3), mail({"to": "b@ok.example"}), policy).outcome == REFUSED
    assert verdict(snapshot("other", tool_calls=3), mail({"to": "b@ok.example"}), policy).outcome == ALLOWED
    late = verdict(snapshot(), mail({"to": "b@ok.example"}), policy, at=T0 + timedelta(seconds=601))
    assert late.outcome == REFUSED and "max_wall_time_s=600" in (late.reason or "")


def test_an_undo_is_always_allowed_and_a_wait_is_held_to_the_step_budget(policy: Policy) -> None:
    undo = Decision(DecisionAction.compensate, "undo", step="jira", tool="jira", arguments={"key": "K"})
    assert verdict(snapshot(tool_calls=99, decisions=99), undo, policy).outcome == ALLOWED
    wait = Decision(DecisionAction.wait, "waiting for tool crm", step="crm", tool="crm")
    assert verdict(snapshot(decisions=3), wait, policy).outcome is None
    assert verdict(snapshot(decisions=10), wait, policy).decision.action is DecisionAction.escalate
    done = Decision(DecisionAction.complete, "all done")
    assert verdict(snapshot(decisions=99), done, policy).outcome is None  # ending is never refused


def test_a_step_that_needs_approval_waits_for_one_request_then_the_grant_lets_it_through(policy: Policy) -> None:
    first = verdict(snapshot(), mail(), policy)
    assert first.outcome == APPROVAL and first.ask is not None
    assert first.decision.action is DecisionAction.wait and first.decision.tool is None  # not a wait for a tool
    assert first.decision.reason == "waiting for approval of step email: email outside the allow-list"
    assert first.ask.digest == arguments_digest(MAIL) and first.ask.expires_at == T0 + timedelta(hours=1)
    pending = ApprovalState(
        request_id=first.ask.request_id,
        step="email",
        tool="email",
        arguments_digest=first.ask.digest,
        requested_at=T0,
        expires_at=first.ask.expires_at,
    )
    again = verdict(snapshot(approvals=[pending]), mail(), policy)
    assert again.outcome == APPROVAL and again.ask is None  # asked once: still waiting, no second request
    granted = pending.model_copy(update={"status": ApprovalStatus.granted, "by": "grace"})
    through = verdict(snapshot(approvals=[granted]), mail(), policy)
    assert through.outcome == ALLOWED and through.approved and "grace" in (through.reason or "")
    # The grant is for those arguments: other arguments need their own approval.
    other = verdict(snapshot(approvals=[granted]), mail({"to": "eve@evil.example"}), policy)
    assert other.outcome == APPROVAL and other.ask is not None and other.ask.request_id != first.ask.request_id


def test_an_expired_or_denied_request_refuses_the_step(policy: Policy) -> None:
    held = ApprovalState(
        request_id="r",
        step="email",
        tool="email",
        arguments_digest=arguments_digest(MAIL),
        requested_at=T0,
        expires_at=T0 + timedelta(seconds=30),
    )
    expired = verdict(snapshot(approvals=[held.model_copy(update={"status": ApprovalStatus.expired})]), mail(), policy)
    assert expired.outcome == REFUSED and "not given within 30 s" in (expired.reason or "")
    denied = held.model_copy(update={"status": ApprovalStatus.denied, "by": "grace"})
    assert "denied by grace" in (verdict(snapshot(approvals=[denied]), mail(), policy).reason or "")


def test_a_tool_that_declares_approval_is_held_whatever_the_policy(policy: Policy) -> None:
    jira = Decision(DecisionAction.dispatch, "next", step="jira", tool="jira", arguments={"key": "K"})
    assert verdict(snapshot(), jira, policy).outcome == ALLOWED
    held = verdict(snapshot(), jira, policy, declared=True)
    assert held.outcome == APPROVAL and "declares" in (held.reason or "")
