"""Workflows are data: the loader, the onboarding file's arguments, and waiting for a tool."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from streamagent.processors.decision.rules import RulesDecider
from streamagent.processors.state.fold import apply
from streamagent.processors.workflow import (
    ONBOARDING,
    WorkflowError,
    default_workflows,
    load_workflow,
    load_workflows,
    project_key,
)

from streamagent.config import DEFAULT_WORKFLOWS_DIR
from streamagent.errors import Unprocessable
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    OnboardingRequest,
    RunDeadlineExceeded,
    RunRequested,
    RunStatus,
    StateSnapshot,
)

RUN = "0b6f9d0e-4a43-4d4b-9d55-3f1c5a7e2c10"
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
REQUEST = OnboardingRequest(
    company_name="Acme Robotics",
    company_domain="acme-robotics.io",
    contact_name="Ada Lovelace",
    contact_email="ada@acme-robotics.io",
    goal="onboard new B2B client",
    requested_by="crm",
)


# -- the arguments the ONBOARDING code built before it became data (the reference) -----------------
def _old_args(step: str, req: OnboardingRequest, results: dict[str, dict[str, Any]], run_id: str) -> dict[str, Any]:
    if step == "enrich":
        return {"domain": req.company_domain}
    if step == "jira":
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
    if step == "draft":
        # The mail the code built is now the draft's template; the model, when configured, writes its own.
        company, project = results["enrich"], results["jira"]
        return {
            "company_name": req.company_name,
            "company_domain": req.company_domain,
            "contact_name": req.contact_name,
            "jira_key": project["key"],
            "industry": company.get("industry", ""),
            "employees": company.get("employees", ""),
            "country": company.get("country", ""),
            "goal": req.goal,
            "template_subject": f"Welcome to streamagent, {req.company_name}",
            "template_body": (
                f"Hello {req.contact_name},\n\nWelcome aboard! We set up Jira project {project['key']} "
                f"for {req.company_name}, tailored to the {company.get('industry', 'your')} industry.\n"
            ),
        }
    if step == "email":
        draft = results["draft"]
        return {"to": req.contact_email, "subject": draft["subject"], "body": draft["body"]}
    company, project, mail = results["enrich"], results["jira"], results["email"]
    return {
        "channel": "#onboarding",
        "text": (
            f"New client {req.company_name} ({company.get('industry', '?')}, "
            f"{company.get('employees', '?')} employees): Jira {project['key']}, "
            f"welcome mail {mail.get('message_id', '?')} sent to {mail.get('to', '?')}."
        ),
    }


FULL = {
    "enrich": {"name": "Acme", "industry": "Robotics", "employees": 120},
    "jira": {"id": "10001", "key": "ACMEX1Y2Z3"},
    "draft": {"subject": "Welcome, Acme", "body": "Dear Ada, ...", "drafted_by": "model"},
    "email": {"message_id": "m-42", "to": "ada@acme-robotics.io"},
}
SPARSE = {"enrich": {}, "jira": {"key": "ACMEX1Y2Z3"}, "draft": {"subject": "s", "body": "b"}, "email": {}}


@pytest.mark.parametrize("results", [FULL, SPARSE], ids=["full", "missing-optional-keys"])
def test_the_onboarding_file_builds_exactly_the_arguments_the_code_built(results: dict[str, Any]) -> None:
    for step in ONBOARDING.steps:
        assert step.build(REQUEST, results, RUN) == _old_args(step.name, REQUEST, results, RUN), step.name


def test_the_onboarding_file_keeps_order_needs_failure_policy_and_the_undo() -> None:
    assert ONBOARDING.step_names == ("enrich", "jira", "draft", "email", "slack")
    assert [s.needs for s in ONBOARDING.steps] == [
        (),
        ("enrich",),
        ("enrich", "jira"),
        ("enrich", "jira", "draft"),
        ("enrich", "jira", "email"),
    ]
    assert [s.on_failure for s in ONBOARDING.steps] == ["fail", "fail", "fail", "fail", "escalate"]
    undo = ONBOARDING.step("jira").compensation
    assert undo is not None and undo.tool == "jira"
    assert undo.args.build(REQUEST, FULL, RUN) == {"key": "ACMEX1Y2Z3"}
    assert [s.name for s in ONBOARDING.steps if s.compensation] == ["jira"]
    assert ONBOARDING.goal and set(ONBOARDING.tools) == {"enrich", "jira", "draft", "email", "slack"}
    assert ONBOARDING.compensate_abandoned


def test_a_required_output_that_is_missing_is_an_error_not_a_guess() -> None:
    with pytest.raises(KeyError, match=r"steps\.jira\.output\.key"):
        ONBOARDING.step("draft").build(REQUEST, {"enrich": {}, "jira": {}}, RUN)
    with pytest.raises(KeyError, match=r"steps\.draft\.output\.body"):
        ONBOARDING.step("email").build(REQUEST, {"enrich": {}, "jira": {}, "draft": {"subject": "s"}}, RUN)


def test_the_default_folder_is_the_repository_workflows_folder() -> None:
    assert Path(__file__).resolve().parents[3] / "workflows" == DEFAULT_WORKFLOWS_DIR
    assert "onboarding" in default_workflows()


def test_the_onboarding_email_goes_to_the_contact_memory_holds_else_to_the_requests() -> None:
    email, draft = ONBOARDING.step("email"), ONBOARDING.step("draft")
    assert email.read_refs(REQUEST, FULL, RUN) == {"contact": "contact/acme-robotics.io"}
    assert draft.read_refs(REQUEST, FULL, RUN) == {"contact": "contact/acme-robotics.io"}
    remembered = {"contact": {"email": "grace@acme-robotics.io", "name": "Grace Hopper"}}
    built = email.build(REQUEST, FULL, RUN, remembered)
    assert built["to"] == "grace@acme-robotics.io" and built["body"] == FULL["draft"]["body"]
    # The draft greets the contact memory holds: the model writes to her, and so does the template.
    drafting = draft.build(REQUEST, FULL, RUN, remembered)
    assert drafting["contact_name"] == "Grace Hopper" and drafting["template_body"].startswith("Hello Grace Hopper,")
    assert draft.build(REQUEST, FULL, RUN)["contact_name"] == REQUEST.contact_name
    partly = email.build(REQUEST, FULL, RUN, {"contact": {"name": "Grace Hopper"}})
    assert partly["to"] == REQUEST.contact_email  # memory has no email: the request's
    assert email.build(REQUEST, FULL, RUN)["to"] == REQUEST.contact_email


def test_a_memory_path_needs_the_entity_among_the_steps_reads(tmp_path: Path) -> None:
    text = GOOD.replace(
        'args.domain = "{request.company_domain}"',
        'reads = ["company:{request.company_domain}"]\n'
        'args.domain = "{memory.company.domain | or: request.company_domain}"',
    )
    workflow = load_workflow(_write(tmp_path, text))
    look = workflow.steps[0]
    assert look.build(REQUEST, {}, RUN, {"company": {"domain": "acme.example"}})["domain"] == "acme.example"
    for bad, why in (
        ('"{memory.contact.email}"', "does not read 'contact'"),
        ('"{memory.company}"', "memory.<entity>.<field>"),
        ('"{request.company_domain | or: nowhere.x}"', "a path starts with"),
    ):
        with pytest.raises(WorkflowError, match=why):
            load_workflow(_write(tmp_path, text.replace('"{memory.company.domain | or: request.company_domain}"', bad)))
    for reads, why in (('["company"]', "entity:"), ('["Company:{run.id}"]', "an entity is a name"), ('"x"', "list")):
        with pytest.raises(WorkflowError, match=why):
            load_workflow(_write(tmp_path, text.replace('["company:{request.company_domain}"]', reads)))


# -- the loader: good and malformed files ------------------------------------------------------------
GOOD = """
name = "tiny"
goal = "look a company up and tell someone"
tools = ["lookup", "notify"]

[[steps]]
name = "look"
tool = "lookup"
args.domain = "{request.company_domain}"
args.retries = 3

[[steps]]
name = "tell"
tool = "notify"
needs = ["look"]
on_failure = "escalate"
args.text = "{{literal}} {steps.look.output.size | default: n/a} for run {run.id}"
args.size = "{steps.look.output.size}"
compensate.tool = "notify"
compensate.args.text = "undo {steps.tell.output.id}"
"""


def _write(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_a_good_file_loads(tmp_path: Path) -> None:
    workflow = load_workflow(_write(tmp_path, GOOD))
    assert workflow.name == "tiny" and workflow.tools == ("lookup", "notify")
    look, tell = workflow.steps
    assert look.build(REQUEST, {}, RUN) == {"domain": "acme-robotics.io", "retries": 3}
    assert tell.build(REQUEST, {"look": {"size": 7}}, RUN) == {"text": f"{{literal}} 7 for run {RUN}", "size": 7}
    text = dict(tell.args.values)["text"]
    assert text.render(REQUEST, {"look": {}}, RUN) == f"{{literal}} n/a for run {RUN}"  # its default
    with pytest.raises(KeyError, match=r"steps\.look\.output\.size"):
        tell.build(REQUEST, {"look": {}}, RUN)  # size has none
    assert tell.on_failure == "escalate" and tell.needs == ("look",)
    assert load_workflows(tmp_path) == {"tiny": workflow}


def _replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


MALFORMED = [
    ("not = toml = at all", "toml", "line 1"),
    (_replace('name = "tiny"', 'name = "other"'), "name", "must match the file name"),
    (_replace('goal = "look a company up and tell someone"\n', ""), "goal", "is required"),
    (_replace('tools = ["lookup", "notify"]', "tools = []"), "tools", "non-empty list"),
    (
        _replace('tools = ["lookup", "notify"]', 'tools = ["lookup", "notify"]\ncolour = "red"'),
        "colour",
        "unknown field",
    ),
    (_replace('tool = "notify"\nneeds', 'tool = "crm"\nneeds'), "steps.tell.tool", "not in the workflow's tools"),
    (_replace('needs = ["look"]', 'needs = ["later"]'), "steps.tell.needs", "not a step declared before"),
    (_replace('on_failure = "escalate"', 'on_failure = "panic"'), "steps.tell.on_failure", "'fail' or 'escalate'"),
    (_replace("{request.company_domain}", "{request.domain}"), "steps.look.args.domain", "request has no field"),
    (
        _replace('args.size = "{steps.look', 'args.size = "{steps.ghost'),
        "steps.tell.args.size",
        "not in this step's needs",
    ),
    (_replace("{steps.look.output.size}", "{steps.look.size}"), "steps.tell.args.size", "steps.<step>.output"),
    (_replace("{run.id}", "{env.HOME}"), "steps.tell.args.text", "a path starts with"),
    (_replace("| default: n/a", "| upper"), "steps.tell.args.text", "unknown filter"),
    (_replace("{request.company_domain}", "{request.company_domain"), "steps.look.args.domain", "unbalanced"),
    (_replace("args.retries = 3", "args.retries = [3]"), "steps.look.args.retries", "text, a number or a boolean"),
    (_replace('compensate.tool = "notify"', 'compensate.tool = "shredder"'), "steps.tell.compensate.tool", "not in"),
    (_replace('name = "tell"', 'name = "look"'), "steps[1].name", "declared twice"),
    (_replace('name = "tell"', 'name = "Tell Me"'), "steps[1].name", "lowercase"),
]


@pytest.mark.parametrize(("text", "field", "reason"), MALFORMED, ids=[m[1] + ":" + m[2] for m in MALFORMED])
def test_a_malformed_file_is_refused_with_its_file_field_and_reason(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(WorkflowError) as info:
        load_workflows(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert field in info.value.where
    assert reason in info.value.reason


def test_an_empty_or_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="holds no"):
        load_workflows(tmp_path)
    with pytest.raises(WorkflowError, match="is not a directory"):
        load_workflows(tmp_path / "absent")


# -- the rules decider on data: a run names its workflow; a missing tool makes it wait ---------------
def _requested(workflow: str = "onboarding", deadline_s: float | None = None) -> RunRequested:
    return RunRequested(
        event_id="req",
        run_id=RUN,
        occurred_at=T0,
        company_name=REQUEST.company_name,
        company_domain=REQUEST.company_domain,
        contact_name=REQUEST.contact_name,
        contact_email=REQUEST.contact_email,
        requested_by="crm",
        deadline_s=deadline_s,
        workflow=workflow,
    )


def test_a_request_defaults_to_onboarding_and_the_run_carries_its_workflow() -> None:
    event = _requested()
    assert RunRequested.model_validate(event.model_dump(exclude={"workflow"})).workflow == "onboarding"
    snap = apply(None, event, 600.0).state.snapshot
    assert snap.request.workflow == "onboarding"


def test_the_fold_refuses_a_request_for_an_unknown_workflow() -> None:
    with pytest.raises(Unprocessable) as info:
        apply(None, _requested("no-such-flow"), 600.0)
    assert info.value.reason == "unknown_workflow"


def test_the_decider_follows_the_workflow_the_run_names(tmp_path: Path) -> None:
    tiny = load_workflow(_write(tmp_path, GOOD))
    decider = RulesDecider({"onboarding": ONBOARDING, "tiny": tiny})
    snap = apply(None, _requested("tiny"), 600.0, tiny).state.snapshot
    assert [s.name for s in snap.steps] == ["look", "tell"]
    decision = decider.decide(snap)
    assert decision is not None and decision.action is DecisionAction.dispatch
    assert (decision.step, decision.tool, decision.arguments) == (
        "look",
        "lookup",
        {"domain": "acme-robotics.io", "retries": 3},
    )


def _record(snap: StateSnapshot, action: DecisionAction, reason: str, step: str | None, tool: str | None) -> Any:
    return DecisionRecorded(
        event_id=f"dec-{snap.version}",
        run_id=snap.run_id,
        occurred_at=T0 + timedelta(seconds=snap.version),
        decision_id=f"dec-{snap.version}",
        based_on_version=snap.version,
        action=action,
        step=step,
        tool=tool,
        reason=reason,
        decider="rules",
    )


def test_a_step_whose_tool_is_unavailable_waits_visibly_then_escalates_at_the_deadline() -> None:
    asked: list[str] = []

    def available(tool: str) -> bool:
        asked.append(tool)
        return tool != "enrich"

    decider = RulesDecider(ONBOARDING, available)
    state = apply(None, _requested(deadline_s=30), 600.0).state
    decision = decider.decide(state.snapshot)
    assert decision is not None
    assert decision.action is DecisionAction.wait
    assert decision.reason == "waiting for tool enrich"
    assert (decision.step, decision.tool, decision.arguments) == ("enrich", "enrich", {})
    assert "enrich" in asked and "enrich" not in decision.context["available_tools"]

    # Recorded like any decision: the run shows what it waits for, and asks for nothing more.
    waited = apply(state, _record(state.snapshot, decision.action, decision.reason, "enrich", "enrich"), 600.0)
    assert waited.changed and not waited.publish
    assert waited.state.snapshot.status is RunStatus.running
    assert waited.state.snapshot.reason == "waiting for tool enrich"
    assert waited.state.snapshot.step("enrich").status.value == "pending"

    # The deadline passes: the run escalates.
    late = apply(
        waited.state,
        RunDeadlineExceeded(
            event_id="late", run_id=RUN, occurred_at=T0 + timedelta(seconds=31), deadline_at=T0 + timedelta(seconds=30)
        ),
        600.0,
    )
    assert late.publish
    ending = decider.decide(late.state.snapshot)
    assert ending is not None and ending.action is DecisionAction.escalate
    assert "deadline" in ending.reason


def test_once_the_tool_is_available_the_step_is_dispatched_and_the_wait_is_cleared() -> None:
    up = {"enrich": False}
    decider = RulesDecider(ONBOARDING, lambda tool: up.get(tool, True))
    state = apply(None, _requested(), 600.0).state
    wait = decider.decide(state.snapshot)
    assert wait is not None and wait.action is DecisionAction.wait
    state = apply(state, _record(state.snapshot, wait.action, wait.reason, "enrich", "enrich"), 600.0).state
    up["enrich"] = True
    go = decider.decide(state.snapshot)
    assert go is not None and go.action is DecisionAction.dispatch and go.step == "enrich"
    after = apply(state, _record(state.snapshot, go.action, go.reason, "enrich", "enrich"), 600.0).state
    assert after.snapshot.reason is None
    assert after.snapshot.step("enrich").status.value == "dispatched"


def test_every_tool_is_available_by_default() -> None:
    decision = RulesDecider().decide(apply(None, _requested(), 600.0).state.snapshot)
    assert decision is not None and decision.action is DecisionAction.dispatch
    assert decision.context["available_tools"] == ["draft", "email", "enrich", "jira", "slack"]


def test_a_snapshot_of_a_workflow_the_decider_does_not_know_escalates() -> None:
    snap = apply(None, _requested(), 600.0).state.snapshot
    stray = snap.model_copy(update={"request": snap.request.model_copy(update={"workflow": "gone"})})
    decision = RulesDecider(ONBOARDING).decide(stray)
    assert decision is not None and decision.action is DecisionAction.escalate
    assert "unknown workflow 'gone'" in decision.reason


# -- compatibility: events written before requests named a workflow -----------------------------------
def test_a_request_and_a_snapshot_written_with_the_previous_schemas_read_as_onboarding() -> None:
    from streamagent import codec

    registry = codec.registry()
    old = {e.name: e for e in registry.by_fingerprint.values() if not e.current}
    request = _requested()
    v2 = next(
        e
        for e in registry.by_fingerprint.values()
        if e.name.endswith("RunRequested") and not e.current and any(f["name"] == "labels" for f in e.parsed["fields"])
    )
    decoded = codec.decode(codec.encode(request, schema=v2))
    assert isinstance(decoded, RunRequested) and decoded.workflow == "onboarding"
    assert decoded.model_dump(exclude={"schema_version"}) == request.model_dump(exclude={"schema_version"})
    snap = apply(None, request, 600.0).state.snapshot
    snapshots = [e for e in registry.by_fingerprint.values() if e.name.endswith("StateSnapshot") and not e.current]
    newest_old = max(snapshots, key=lambda e: len(str(e.parsed)))
    again = codec.decode(codec.encode(snap, schema=newest_old))
    assert isinstance(again, StateSnapshot) and again.request.workflow == "onboarding" and again == snap
    assert old  # history is kept


def test_a_processor_refusing_a_malformed_workflow_reports_one_line_without_traceback(tmp_path: Path) -> None:
    from streamagent.console.cli import _describe

    message, code, expected = _describe(WorkflowError(tmp_path / "x.toml", "steps.a.tool", "is required"))
    assert (message, code, expected) == (f"invalid workflow: {tmp_path / 'x.toml'}: steps.a.tool: is required", 2, True)
