"""The onboarding workflow, declared as data: its steps, their order, and what each needs.

The rules decider walks this list; the state processor uses it to lay out a new run's steps.
Arguments are built only from the request and earlier steps' outputs, so a decision is a pure
function of the snapshot it was made on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from streamagent.events import OnboardingRequest, RunStatus, StateSnapshot, StepStatus

Results = Mapping[str, Mapping[str, Any]]
ArgsBuilder = Callable[[OnboardingRequest, Results, str], dict[str, Any]]


@dataclass(frozen=True)
class Step:
    name: str
    tool: str
    build: ArgsBuilder
    needs: tuple[str, ...] = ()
    # What a permanent failure of this step does to the run: end it as failed, or hand it to a human.
    on_failure: Literal["fail", "escalate"] = "fail"
    # Optional undo, run when the run ends without completing: (tool, arguments builder).
    compensation: tuple[str, ArgsBuilder] | None = None


@dataclass(frozen=True)
class Workflow:
    name: str
    steps: tuple[Step, ...] = field(default_factory=tuple)
    # A run that passed its deadline is abandoned: what it created is undone (in reverse order).
    # A run that fails on a step keeps what it created and reports it (graceful degradation).
    compensate_abandoned: bool = True

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def undo_pending(self, snapshot: StateSnapshot) -> bool:
        """An abandoned run (escalated after its deadline) that created something it can undo."""
        if not (self.compensate_abandoned and snapshot.status is RunStatus.escalated and snapshot.deadline_exceeded):
            return False
        return any(
            s.status is StepStatus.succeeded and self.step(s.name).compensation is not None for s in snapshot.steps
        )


def project_key(company_name: str, run_id: str) -> str:
    """A Jira key unique per run: up to 4 letters of the company and 6 base-36 characters (31 bits)
    of the run id's hash, within Jira's 10-character limit."""
    letters = re.sub(r"[^A-Z]", "", company_name.upper())[:4] or "CL"
    number = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big")
    suffix = ""
    for _ in range(6):
        number, digit = divmod(number, 36)
        suffix += "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[digit]
    return f"{letters}{suffix}"


def _enrich_args(req: OnboardingRequest, _results: Results, _run_id: str) -> dict[str, Any]:
    return {"domain": req.company_domain}


def _jira_args(req: OnboardingRequest, results: Results, run_id: str) -> dict[str, Any]:
    company = results["enrich"]
    return {
        "key": project_key(req.company_name, run_id),
        "name": f"{req.company_name} onboarding",
        "description": (
            f"Onboarding {req.company_name} ({company.get('industry', 'unknown industry')}, "
            f"{company.get('employees', '?')} employees). Goal: {req.goal}"
        ),
        "lead_email": req.contact_email,
    }


def _email_args(req: OnboardingRequest, results: Results, _run_id: str) -> dict[str, Any]:
    company, project = results["enrich"], results["jira"]
    return {
        "to": req.contact_email,
        "subject": f"Welcome to streamagent, {req.company_name}",
        "body": (
            f"Hello {req.contact_name},\n\nWelcome aboard! We set up Jira project {project['key']} "
            f"for {req.company_name}, tailored to the {company.get('industry', 'your')} industry.\n"
        ),
    }


def _slack_args(req: OnboardingRequest, results: Results, _run_id: str) -> dict[str, Any]:
    company, project, mail = results["enrich"], results["jira"], results["email"]
    return {
        "channel": "#onboarding",
        "text": (
            f"New client {req.company_name} ({company.get('industry', '?')}, "
            f"{company.get('employees', '?')} employees): Jira {project['key']}, "
            f"welcome mail {mail.get('message_id', '?')} sent to {req.contact_email}."
        ),
    }


def _close_jira_args(_req: OnboardingRequest, results: Results, _run_id: str) -> dict[str, Any]:
    return {"key": results["jira"]["key"]}


ONBOARDING = Workflow(
    name="onboarding",
    steps=(
        Step("enrich", "enrich", _enrich_args),
        Step("jira", "jira", _jira_args, needs=("enrich",), compensation=("jira", _close_jira_args)),
        Step("email", "email", _email_args, needs=("enrich", "jira")),
        Step("slack", "slack", _slack_args, needs=("enrich", "jira", "email"), on_failure="escalate"),
    ),
)
