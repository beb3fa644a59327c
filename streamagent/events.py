"""Pydantic models of every event; the Avro schemas in ``schemas/`` are their wire contract.

Field names match the Avro field names one to one. Fields that carry free-form JSON objects on the
wire (tool arguments, outputs, the decider's context) are dicts here; the codec turns them into
JSON strings so the Avro schemas stay flat and readable by any consumer.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, EmailStr, Field, ValidationError, field_validator

_DOMAIN_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-.")
# The workflow a request runs when it names none (a file under workflows/).
DEFAULT_WORKFLOW = "onboarding"


def new_id() -> str:
    return str(uuid.uuid4())


def stable_id(*parts: str) -> str:
    """A deterministic id: the same inputs give the same id in every process and every replay."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "streamagent:" + ":".join(parts)))


def command_id(run_id: str, step: str, operation: str = "execute") -> str:
    """Stable per (run, step, operation): however often a step is decided, its effect has one key, and
    the fold accepts a result only for the command id the run's step would have been sent."""
    return stable_id(run_id, step, operation)


# The tool name of a step that starts a child workflow instead of calling a tool: ``workflow:<name>``. No
# tool has a ':' in its name, so no tool can be commanded, or answer, as one (streamagent.authn).
CHILD_TOOL_PREFIX = "workflow:"


def child_tool(workflow: str) -> str:
    return CHILD_TOOL_PREFIX + workflow


def is_child_tool(tool: str | None) -> bool:
    return tool is not None and tool.startswith(CHILD_TOOL_PREFIX)


def child_run_id(parent_run_id: str, step: str, command: str) -> str:
    """The run id of the child a parent's step starts: the same for every dispatch and redelivery of that
    step's command, so the child is requested once however often it is started."""
    return stable_id(parent_run_id, step, command, "child")


def ended_by_parent_id(run_id: str) -> str:
    """The event id of the ending a parent that ended sends its still running child run."""
    return stable_id(run_id, "ended-by-parent")


def requested_event_id(run_id: str) -> str:
    """The event id of a run's request on the run log (intake writes it): one per run, however often the
    same upstream request arrives, so the fold and the projection take copies of it once."""
    return stable_id(run_id, "requested")


def now() -> datetime:
    """Wall-clock time at the wire's precision (Avro timestamp-millis), so events survive a round trip."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class Event(BaseModel):
    """The envelope every event carries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SCHEMA_NAME: ClassVar[str] = ""
    JSON_FIELDS: ClassVar[tuple[str, ...]] = ()

    event_id: str = Field(default_factory=new_id)
    run_id: str = Field(min_length=1)
    causation_id: str | None = None
    occurred_at: datetime = Field(default_factory=now)
    schema_version: int = 1

    @field_validator("occurred_at")
    @classmethod
    def _millis(cls, value: datetime) -> datetime:
        # The wire keeps milliseconds (Avro timestamp-millis); keep no more, so decode(encode(e)) == e.
        return value.replace(microsecond=value.microsecond // 1000 * 1000)

    @property
    def type(self) -> str:
        return type(self).__name__


class RunRequested(Event):
    SCHEMA_NAME = "io.streamagent.events.RunRequested"

    # 4: the parent link of a child run (schemas/history/RunRequested.v3.avsc and older decode with none).
    schema_version: int = 4
    company_name: str = Field(min_length=1, max_length=200)
    company_domain: str = Field(min_length=3, max_length=253)
    contact_name: str = Field(min_length=1, max_length=200)
    contact_email: EmailStr
    goal: str = Field(default="onboard new client", min_length=1, max_length=2000)
    requested_by: str = Field(min_length=1, max_length=200)
    deadline_s: float | None = Field(default=None, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)
    workflow: str = Field(default=DEFAULT_WORKFLOW, min_length=1, max_length=100)
    # A child run (a parent's step that names a workflow): which run, step and command it answers. Only
    # the decision processor writes a request with these (streamagent.authn); intake's never carry them.
    parent_run_id: str | None = None
    parent_step: str | None = None
    parent_command_id: str | None = None

    @property
    def is_child(self) -> bool:
        return self.parent_run_id is not None

    @field_validator("company_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        value = value.strip().lower()
        if "." not in value or not set(value) <= _DOMAIN_CHARS or value.startswith((".", "-")):
            raise ValueError("must be a DNS domain such as acme.io")
        return value


class DecisionAction(StrEnum):
    dispatch = "dispatch"
    complete = "complete"
    fail = "fail"
    escalate = "escalate"
    compensate = "compensate"
    # Nothing to do yet (e.g. the next step's tool is not available); the reason says what for.
    wait = "wait"


class ParallelDispatch(BaseModel):
    """A further step a fan-out decision dispatches beside the one its ``step`` names: one command each."""

    model_config = ConfigDict(frozen=True)

    step: str
    tool: str
    command_id: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    memory: dict[str, int] = Field(default_factory=dict)
    command_partition: int | None = None
    command_offset: int | None = None


class DecisionRecorded(Event):
    SCHEMA_NAME = "io.streamagent.events.DecisionRecorded"
    JSON_FIELDS = ("arguments", "context")

    # 4: the memory it read (schemas/history/DecisionRecorded.v4.avsc and older decode with none).
    # 5: the further steps of a fan-out (history/DecisionRecorded.v5.avsc and older decode with none).
    schema_version: int = 5
    decision_id: str
    based_on_version: int
    action: DecisionAction
    step: str | None = None
    tool: str | None = None
    command_id: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    reason: str
    decider: str
    context: dict[str, Any] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    # The guard's verdict on what the decider proposed (processors/guard): allowed | approval |
    # refused, why, and the version of the policy in force. None: decided before the guard existed,
    # or nothing to judge (a wait for a tool, the run's end).
    guard_outcome: str | None = None
    guard_reason: str | None = None
    policy_version: str | None = None
    # The shared memory the decision read: ``contact/acme.io`` -> its version (0: memory had none).
    memory: dict[str, int] = Field(default_factory=dict)
    # A fan-out: the further steps this decision dispatches beside ``step``, each with its own command.
    parallel: list[ParallelDispatch] = Field(default_factory=list)
    # Where the command landed (its produce was acknowledged before this event was written): the
    # state processor judges a command lost only once its tool's group has consumed past it.
    command_partition: int | None = None
    command_offset: int | None = None

    def dispatched(self) -> list[ParallelDispatch]:
        """Every step this decision sends a command for (a dispatch or an undo), the first one first."""
        if self.action not in (DecisionAction.dispatch, DecisionAction.compensate) or self.step is None:
            return []
        first = ParallelDispatch(
            step=self.step,
            tool=self.tool or "",
            command_id=self.command_id or "",
            arguments=self.arguments,
            memory=self.memory,
            command_partition=self.command_partition,
            command_offset=self.command_offset,
        )
        return [first, *self.parallel]


class ToolCommand(Event):
    SCHEMA_NAME = "io.streamagent.events.ToolCommand"
    JSON_FIELDS = ("arguments",)

    # 5: the run's model budget left (schemas/history/ToolCommand.v4.avsc and older decode with none).
    schema_version: int = 5
    command_id: str
    decision_id: str
    tool: str
    step: str
    operation: str = "execute"
    arguments: dict[str, Any] = Field(default_factory=dict)
    deadline_at: datetime
    # ``v1:<key id>:<hex>``, HMAC-SHA256 by the decision processor (streamagent.signing): a tool runs
    # only commands that verify, so writing to a command topic is not enough to command a tool.
    # Empty in events written before v2 (and in forgeries): such a command is refused.
    signature: str = ""
    # ``a1:<key id>:<expiry ms>:<hex>`` (streamagent.approval): the guard's proof that a person approved
    # this step with exactly these arguments. Checked by the tool for any command policy says needs it.
    approval: str = ""
    # The memory versions it was decided on (4): the tool refuses it as stale-memory if one changed since.
    memory: dict[str, int] = Field(default_factory=dict)
    # What the run may still spend on models when this was decided (5): the least of what its workflow's
    # per-run caps and its policy budgets leave; None: no cap. A model-backed tool checks its call against
    # it before making it. Signed once set, so it cannot be raised on the way.
    budget_tokens: int | None = Field(None, ge=0)
    budget_cost_usd: float | None = Field(None, ge=0)


# A tool's ``error_kind`` for a command it did not execute because the memory it was decided on changed
# since: the fold puts the step back to be decided again, on the new version.
STALE_MEMORY = "stale-memory"


class ToolStatus(StrEnum):
    succeeded = "succeeded"
    failed = "failed"


class ToolResult(Event):
    SCHEMA_NAME = "io.streamagent.events.ToolResult"
    JSON_FIELDS = ("output", "model_context")

    # 2: what a model-backed tool spent and asked (schemas/history/ToolResult.v1.avsc decodes with none).
    # 3: the tool calls a child run made (history/ToolResult.v2.avsc and older decode with 0).
    schema_version: int = 3
    command_id: str
    tool: str
    step: str
    operation: str = "execute"
    status: ToolStatus
    output: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    attempts: int = 1
    duration_ms: int = 0
    # A tool that asks a model reports it here, apart from its output: the fold adds the tokens and
    # cost to the run's spending (the guard's budgets), the projection to the run's figures, and the
    # timeline shows the context; later steps' arguments see only the output.
    model: str | None = None
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    cost_usd: float = Field(0.0, ge=0)
    model_context: dict[str, Any] = Field(default_factory=dict)
    # The result of a child workflow's step (tool ``workflow:<name>``) stands for the child's commands:
    # they join the parent's count of tool calls, for its budgets.
    tool_calls: int = Field(0, ge=0)


class RunCompleted(Event):
    SCHEMA_NAME = "io.streamagent.events.RunCompleted"
    JSON_FIELDS = ("results",)

    decision_id: str
    results: dict[str, Any] = Field(default_factory=dict)
    reason: str


class FailureStatus(StrEnum):
    failed = "failed"
    escalated = "escalated"
    cancelled = "cancelled"  # an operator's ``streamagent cancel``, or a cancelled parent's child


class RunFailed(Event):
    SCHEMA_NAME = "io.streamagent.events.RunFailed"
    JSON_FIELDS = ("results",)

    decision_id: str
    status: FailureStatus
    reason: str
    failed_step: str | None = None
    results: dict[str, Any] = Field(default_factory=dict)
    # 2: ``cancelled`` among the statuses (schemas/history/RunFailed.v1.avsc decodes as before).
    schema_version: int = 2


class RunDeadlineExceeded(Event):
    SCHEMA_NAME = "io.streamagent.events.RunDeadlineExceeded"

    deadline_at: datetime


class CommandLost(Event):
    """Evidence that a command will not be answered; the fold re-drives it or fails its step."""

    SCHEMA_NAME = "io.streamagent.events.CommandLost"

    command_id: str
    step: str
    tool: str
    redrive: int
    give_up: bool = False
    evidence: str


class CommandResent(Event):
    """A lost command was sent again; where the copy sits is what the next loss check looks at."""

    SCHEMA_NAME = "io.streamagent.events.CommandResent"

    command_id: str
    step: str
    tool: str
    redrive: int
    command_partition: int
    command_offset: int


class MemoryChanged(Event):
    """An entity a decision of this run read has a new version (the decision processor's memory watch).

    What it means is the run's state's to say: a step held for approval on the old version is decided
    again (a person must approve what will actually be done); a dispatched step is checked by its tool
    before the call (``stale-memory``); a step whose effect is done keeps it, and this records that the
    facts changed after it."""

    SCHEMA_NAME = "io.streamagent.events.MemoryChanged"

    decision_id: str  # the decision that read the older version
    step: str
    ref: str
    read_version: int  # what the decision read (0: memory had none)
    version: int  # what memory holds now (0: deleted)
    as_of: datetime  # when the new version was applied


class ApprovalRequested(Event):
    """The guard holds a step until a person approves it (``streamagent approve RUN STEP``)."""

    SCHEMA_NAME = "io.streamagent.events.ApprovalRequested"
    JSON_FIELDS = ("arguments",)

    request_id: str  # stable per (run, step, arguments digest): asking twice is one request
    decision_id: str
    step: str
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    arguments_digest: str
    reason: str  # which policy rule asks for approval
    policy_version: str
    expires_at: datetime  # unanswered by then: the run escalates


class ApprovalGranted(Event):
    SCHEMA_NAME = "io.streamagent.events.ApprovalGranted"

    request_id: str
    step: str
    by: str = Field(min_length=1, max_length=200)
    note: str = Field(default="", max_length=2000)


class ApprovalDenied(Event):
    SCHEMA_NAME = "io.streamagent.events.ApprovalDenied"

    request_id: str
    step: str
    by: str = Field(min_length=1, max_length=200)
    note: str = Field(default="", max_length=2000)


# How a cancelled run's reason starts (and its children's, after "parent run ... ended (cancelled): ").
CANCELLED = "cancelled by "


def is_cancel(snap: StateSnapshot, reason: str | None) -> bool:
    """Whether a decision to fail ``snap`` with ``reason`` is the operator's cancel (the decision gating
    takes for a run with ``cancelled``), not a failure decided before the cancel was folded."""
    return snap.cancelled is not None and reason == snap.cancelled


class RunCancelRequested(Event):
    """An operator asks to stop a run (``streamagent cancel``). Signed with the operator's key, whose
    identity ``by`` must be (streamagent.authn); the fold marks the run, the decision processor ends it."""

    SCHEMA_NAME = "io.streamagent.events.RunCancelRequested"

    by: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=2000)

    @property
    def says(self) -> str:
        """The run's reason once cancelled."""
        return f"{CANCELLED}{self.by}" + (f": {self.reason}" if self.reason else "")


def cancel_event_id(run_id: str) -> str:
    """One cancel per run: asking again while it is being cancelled is the same event, folded once."""
    return stable_id(run_id, "cancel")


class ApprovalExpired(Event):
    """Written by the state processor's timer: nobody answered the request before it expired."""

    SCHEMA_NAME = "io.streamagent.events.ApprovalExpired"

    request_id: str
    step: str


class ApprovalStatus(StrEnum):
    requested = "requested"
    granted = "granted"
    denied = "denied"
    expired = "expired"


class ApprovalState(BaseModel):
    """One approval request of a run, as the fold knows it."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    step: str
    tool: str
    arguments_digest: str
    status: ApprovalStatus = ApprovalStatus.requested
    reason: str = ""
    requested_at: datetime
    expires_at: datetime
    by: str | None = None
    note: str | None = None
    decided_at: datetime | None = None


class RunStatus(StrEnum):
    running = "running"
    completed = "completed"
    failed = "failed"
    escalated = "escalated"
    # Ended by an operator (``streamagent cancel``) or with a cancelled parent: not a failure of the run.
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self is not RunStatus.running


class StepStatus(StrEnum):
    pending = "pending"
    dispatched = "dispatched"
    succeeded = "succeeded"
    failed = "failed"
    compensating = "compensating"
    compensated = "compensated"


class StepState(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    status: StepStatus = StepStatus.pending
    command_id: str | None = None
    decision_id: str | None = None
    attempts: int = 0
    output: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    command_partition: int | None = None
    command_offset: int | None = None
    dispatched_at: datetime | None = None
    redrives: int = 0
    # When its result was folded (the result's time): a failed fan-out is undone last finished first.
    finished_at: datetime | None = None


class OnboardingRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    company_name: str
    company_domain: str
    contact_name: str
    contact_email: str
    goal: str
    requested_by: str
    labels: dict[str, str] = Field(default_factory=dict)
    workflow: str = DEFAULT_WORKFLOW
    # A child run's parent (StateSnapshot v7): the run, its step and that step's command.
    parent_run_id: str | None = None
    parent_step: str | None = None
    parent_command_id: str | None = None


class RunPlan(BaseModel):
    """A run's plan as its state carries it (the planner's, see processors/decision/llm/planner.py).

    Written once per run, and folded from the first decision that recorded it in its context
    (``context["plan"]``), so every later snapshot, a replay and ``show`` see the same plan. ``plan``
    is None when the planner failed; ``error`` then says why (the run went on without one).
    """

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    plan: str | None = None
    error: str | None = None
    model: str = ""
    based_on_version: int = 0  # the state version the plan was made on
    decision_id: str = ""  # the decision that first recorded it

    @classmethod
    def of_context(cls, context: Mapping[str, Any], decision_id: str) -> RunPlan | None:
        """The plan a decision's context recorded, or None (no planner, or not written yet: no model)."""
        raw = context.get("plan")
        if not isinstance(raw, Mapping) or not raw.get("model") or (raw.get("plan") is None and not raw.get("error")):
            return None
        try:
            return cls(
                plan=raw.get("plan"),
                error=raw.get("error"),
                model=raw["model"],
                based_on_version=raw.get("based_on_version") or 0,
                decision_id=decision_id,
            )
        except ValidationError:  # a context this version does not understand: no plan rather than no state
            return None


class StateSnapshot(BaseModel):
    """A run's state at one version. Not an ``Event``: it is derived, and replay rebuilds it."""

    model_config = ConfigDict(frozen=True)

    SCHEMA_NAME: ClassVar[str] = "io.streamagent.events.StateSnapshot"
    JSON_FIELDS: ClassVar[tuple[str, ...]] = ()

    run_id: str
    version: int
    status: RunStatus
    request: OnboardingRequest
    steps: list[StepState]
    created_at: datetime
    updated_at: datetime
    deadline_at: datetime
    last_event_id: str
    last_decision_id: str | None = None
    deadline_exceeded: bool = False
    reason: str | None = None
    superseded_decisions: int = 0
    redrive_command_id: str | None = None
    plan: RunPlan | None = None
    # 4: the plan and governance (schemas/history/StateSnapshot.v3.avsc and older decode with neither).
    # 5: when each step finished (history/StateSnapshot.v4.avsc and older decode with none).
    # 6: the tools' part of the spending (history/StateSnapshot.v5.avsc and older decode with 0).
    # 7: a child run's parent link in its request (history/StateSnapshot.v6.avsc and older decode with none).
    # 8: ``cancelled`` (history/StateSnapshot.v7.avsc and older decode with none).
    # 9: ``cancelled`` among the run statuses (history/StateSnapshot.v8.avsc decodes as before).
    schema_version: int = 9
    # Governance: approval requests and what the run has spent, for the guard's budgets.
    approvals: list[ApprovalState] = Field(default_factory=list)
    decisions: int = 0  # decisions taken (recorded and applied)
    tool_calls: int = 0  # commands sent: dispatches and undos
    tokens: int = 0  # model tokens, prompt + completion
    cost_usd: float = 0.0
    # The part of ``tokens``/``cost_usd`` the run's tools spent (a draft): the model decider's ledger has
    # its decisions only, so its caps add these to it.
    tool_tokens: int = 0
    tool_cost_usd: float = 0.0
    # An operator cancelled the run (``RunCancelRequested``): who and why, "cancelled by NAME: WHY". The
    # decision processor ends a running run that has it (status cancelled, this reason) and its live children.
    cancelled: str | None = None
    # ``s1:<key id>:<hex>``: the state processor's HMAC over the snapshot; the decision processor
    # decides only on snapshots that verify (a forged one names no run the pipeline knows).
    signature: str = ""

    def approval(self, step: str) -> ApprovalState | None:
        """The step's latest approval request."""
        found = [a for a in self.approvals if a.step == step]
        return found[-1] if found else None

    def step(self, name: str) -> StepState:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def results(self) -> dict[str, dict[str, Any]]:
        return {s.name: s.output for s in self.steps if s.status is StepStatus.succeeded}


# -- memory: facts the whole system shares ---------------------------------------------------------
# An entity is a kind of fact (``contact``, ``company``, ``preferences``) and a key within it (a company's
# domain). Upstream systems and operators ask for a change with a ``MemoryWrite`` (through intake, like a
# request); the memory processor, the one writer of each key, applies it and publishes the entity's new
# ``EntityVersion`` on the compacted memory topic, which every reader folds into its table.
ENTITY_NAME = r"^[a-z][a-z0-9_-]{0,62}$"
ENTITY_KEY = r"^[^\s/][^\s]{0,199}$"
MAX_ENTITY_FIELDS = 100


def entity_ref(entity: str, key: str) -> str:
    """``contact/acme.io``: an entity's address, its record key on the memory topics and in a decision."""
    return f"{entity}/{key}"


class MemoryWrite(BaseModel):
    """A change to one entity: fields to set and to remove, or the entity's deletion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SCHEMA_NAME: ClassVar[str] = "io.streamagent.memory.MemoryWrite"
    JSON_FIELDS: ClassVar[tuple[str, ...]] = ("set",)

    write_id: str = Field(default_factory=new_id, min_length=1, max_length=200)
    entity: str
    key: str
    set: dict[str, Any] = Field(default_factory=dict)
    unset: list[str] = Field(default_factory=list)
    delete: bool = False
    # The version the writer read (0: the entity must not exist yet); None: apply to whatever is current.
    expected_version: int | None = Field(default=None, ge=0)
    writer: str = Field(min_length=1, max_length=200)
    causation_id: str | None = None
    occurred_at: datetime = Field(default_factory=now)
    schema_version: int = 1

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.match(ENTITY_KEY, value):
            raise ValueError("1 to 200 characters, no spaces, not starting with '/'")
        return value

    @field_validator("entity", mode="before")
    @classmethod
    def _entity(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.match(ENTITY_NAME, value):
            raise ValueError("a name of lowercase letters, digits, '-' or '_', starting with a letter")
        return value

    @field_validator("set")
    @classmethod
    def _fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > MAX_ENTITY_FIELDS:
            raise ValueError(f"at most {MAX_ENTITY_FIELDS} fields")
        for name in value:
            if not name or len(name) > 100 or not name.replace("_", "a").replace("-", "a").isalnum():
                raise ValueError(f"field name {name!r}: letters, digits, '_' or '-', 1 to 100 characters")
        return value

    @property
    def ref(self) -> str:
        return entity_ref(self.entity, self.key)


class EntityVersion(BaseModel):
    """One version of an entity, as the memory processor published it (``deleted``: it no longer exists)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SCHEMA_NAME: ClassVar[str] = "io.streamagent.memory.EntityVersion"
    JSON_FIELDS: ClassVar[tuple[str, ...]] = ("fields",)

    entity: str
    key: str
    version: int = Field(ge=1)
    fields: dict[str, Any] = Field(default_factory=dict)
    deleted: bool = False
    as_of: datetime
    writer: str
    write_id: str
    # The last writes applied to this key, newest last: a write delivered again is recognised and applied
    # once, even after the topic was compacted down to this one record.
    recent_writes: list[str] = Field(default_factory=list)
    schema_version: int = 1

    @property
    def ref(self) -> str:
        return entity_ref(self.entity, self.key)


RUN_EVENTS: tuple[type[Event], ...] = (
    RunRequested,
    MemoryChanged,
    DecisionRecorded,
    RunCompleted,
    RunFailed,
    RunDeadlineExceeded,
    CommandLost,
    CommandResent,
    ApprovalRequested,
    ApprovalGranted,
    ApprovalDenied,
    ApprovalExpired,
    RunCancelRequested,
)
ALL_MODELS: tuple[type[BaseModel], ...] = (
    *RUN_EVENTS,
    ToolCommand,
    ToolResult,
    StateSnapshot,
    MemoryWrite,
    EntityVersion,
)
