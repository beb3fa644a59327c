"""Workflows are data: each file under ``workflows/`` declares one, and this module reads it.

A workflow names its goal, the tools it may use, its steps in order, which earlier steps each one
needs, and how each step's arguments are built from the request and earlier steps' outputs. The
rules decider walks it; the state processor lays out a new run's steps from it. Arguments are built
only from the snapshot, so a decision is a pure function of the snapshot it was made on.

An argument value is a template: literal text with ``{path | filter ...}`` placeholders, where a
path is ``request.<field>``, ``run.id``, ``steps.<step>.output[.<key>...]`` or ``memory.<entity>.<field>``
(an entity the step ``reads``), and the filters are ``or: <path>`` (another path, used when the first is
missing), ``default: <text>`` (used when the path is missing) and ``run_key`` (a key unique per run, see
``project_key``). A value that is one placeholder and nothing else keeps the type of what it names.
Non-string TOML values (numbers, booleans) are taken as they are.

Shared memory. ``reads = ["contact:{request.company_domain}"]`` declares that a step reads the ``contact``
entity keyed by the company's domain: its decision reads that entity's current version from the memory
table, builds the arguments from it, and records the version, so the tool can refuse the command if the
entity changed before the call (``stale-memory``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from streamagent.events import (
    DEFAULT_WORKFLOW,
    ApprovalStatus,
    OnboardingRequest,
    RunStatus,
    StateSnapshot,
    StepStatus,
    child_tool,
    entity_ref,
)

Results = Mapping[str, Mapping[str, Any]]
# Whether a tool can take commands now; the live tool catalogue provides one. Default: every tool.
ToolAvailability = Callable[[str], bool]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_REQUEST_FIELDS = frozenset(OnboardingRequest.model_fields) - {"workflow"}


def every_tool_available(_tool: str) -> bool:
    return True


class WorkflowError(ValueError):
    """A workflow file that cannot be used; the message names the file, the field and the reason."""

    def __init__(self, file: Path | str, where: str, reason: str) -> None:
        self.file, self.where, self.reason = str(file), where, reason
        super().__init__(f"{file}: {where}: {reason}")


class UnknownWorkflow(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.message = f"unknown workflow {name!r} (known: {', '.join(known) or 'none'})"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def project_key(company_name: str, run_id: str) -> str:
    """A key unique per run: up to 4 letters of the text and 6 base-36 characters (31 bits) of the
    run id's hash, 10 characters at most."""
    letters = re.sub(r"[^A-Z]", "", company_name.upper())[:4] or "CL"
    number = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big")
    suffix = ""
    for _ in range(6):
        number, digit = divmod(number, 36)
        suffix += "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[digit]
    return f"{letters}{suffix}"


_MISSING = object()
# What a step's decision read from shared memory: entity name -> the fields of its current version (an
# entity memory has none of is absent).
Memory = Mapping[str, Mapping[str, Any]]
_NO_MEMORY: Memory = {}


def _lookup(path: tuple[str, ...], request: OnboardingRequest, results: Results, run_id: str, memory: Memory) -> Any:
    root, rest = path[0], path[1:]
    found: Any
    if root == "request":
        return getattr(request, rest[0])
    if root == "run":
        return run_id
    if root == "memory":
        found = memory.get(rest[0], _MISSING)
        keys = rest[1:]
    else:
        found = results.get(rest[0], _MISSING)
        keys = rest[2:]
    for key in keys:
        found = found.get(key, _MISSING) if isinstance(found, Mapping) else _MISSING
    return found


@dataclass(frozen=True)
class Placeholder:
    path: tuple[str, ...]
    default: str | None = None
    run_key: bool = False
    # Other paths tried in order when the first is missing (``or: request.contact_email``).
    alternatives: tuple[tuple[str, ...], ...] = ()

    def value(self, request: OnboardingRequest, results: Results, run_id: str, memory: Memory = _NO_MEMORY) -> Any:
        found: Any = _MISSING
        for path in (self.path, *self.alternatives):
            found = _lookup(path, request, results, run_id, memory)
            if found is not _MISSING:
                break
        if found is _MISSING:
            if self.default is None:
                raise KeyError(f"{'.'.join(self.path)} is missing and has no default")
            found = self.default
        return project_key(str(found), run_id) if self.run_key else found


@dataclass(frozen=True)
class Template:
    """Literal text and placeholders, parsed once when the workflow is loaded."""

    parts: tuple[str | Placeholder, ...]

    def render(self, request: OnboardingRequest, results: Results, run_id: str, memory: Memory = _NO_MEMORY) -> Any:
        if len(self.parts) == 1 and isinstance(self.parts[0], Placeholder):
            return self.parts[0].value(request, results, run_id, memory)
        return "".join(p if isinstance(p, str) else str(p.value(request, results, run_id, memory)) for p in self.parts)


@dataclass(frozen=True)
class Arguments:
    """A step's argument mapping: name -> template (or a literal non-string value)."""

    values: tuple[tuple[str, Template | Any], ...] = ()

    def build(
        self, request: OnboardingRequest, results: Results, run_id: str, memory: Memory = _NO_MEMORY
    ) -> dict[str, Any]:
        return {
            name: value.render(request, results, run_id, memory) if isinstance(value, Template) else value
            for name, value in self.values
        }


@dataclass(frozen=True)
class Read:
    """An entity a step reads: its name and the template of its key (``contact:{request.company_domain}``)."""

    entity: str
    key: Template

    def ref(self, request: OnboardingRequest, results: Results, run_id: str) -> str:
        return entity_ref(self.entity, str(self.key.render(request, results, run_id)))


@dataclass(frozen=True)
class Write:
    """A change a step's success makes to an entity: ``writes.company.key = "{request.company_domain}"``,
    ``writes.company.set.account_id = "{steps.accounts.output.id}"``."""

    entity: str
    key: Template
    fields: Arguments

    def ref(self, request: OnboardingRequest, results: Results, run_id: str) -> str:
        return entity_ref(self.entity, str(self.key.render(request, results, run_id)))


@dataclass(frozen=True)
class Compensation:
    tool: str
    args: Arguments


@dataclass(frozen=True)
class Step:
    name: str
    tool: str
    args: Arguments = field(default_factory=Arguments)
    needs: tuple[str, ...] = ()
    # What a permanent failure of this step does to the run: end it as failed, or hand it to a human.
    on_failure: Literal["fail", "escalate"] = "fail"
    # Optional undo, run when the run is abandoned after its deadline.
    compensation: Compensation | None = None
    # The shared entities its arguments are built from (their versions are recorded with the decision).
    reads: tuple[Read, ...] = ()
    # What its result tells shared memory once it succeeded (the decision processor writes it).
    writes: tuple[Write, ...] = ()
    # A step that starts a child run of this workflow instead of calling a tool (``workflow = "kyc-check"``);
    # its ``tool`` is then the reserved ``workflow:<name>`` (streamagent.events.child_tool).
    workflow: str | None = None

    def build(
        self, request: OnboardingRequest, results: Results, run_id: str, memory: Memory = _NO_MEMORY
    ) -> dict[str, Any]:
        return self.args.build(request, results, run_id, memory)

    def read_refs(self, request: OnboardingRequest, results: Results, run_id: str) -> dict[str, str]:
        """Entity name -> the reference (``contact/acme.io``) this run's step reads."""
        return {r.entity: r.ref(request, results, run_id) for r in self.reads}


@dataclass(frozen=True)
class Workflow:
    name: str
    steps: tuple[Step, ...] = field(default_factory=tuple)
    goal: str = ""
    tools: tuple[str, ...] = ()
    # A run that passed its deadline is abandoned: what it created is undone (in reverse order).
    # A run that fails on a step keeps what it created and reports it (graceful degradation).
    compensate_abandoned: bool = True
    source: str = ""
    # Who decides this workflow's runs: None follows the setting (STREAMAGENT_DECIDER).
    decider: Literal["rules", "llm"] | None = None
    # What decides when the model's answer is refused twice or the model is down.
    fallback: Literal["rules", "escalate"] = "rules"
    # Whether a planner writes the run's plan at its start; None follows the setting (STREAMAGENT_PLANNER).
    planner: bool | None = None
    # What one run may spend on model calls; None follows the settings (0 there: no cap).
    max_tokens_per_run: int | None = None
    max_cost_usd_per_run: float | None = None
    # How many steps may be in flight at once (fan-out): 1 runs one step at a time, as workflows
    # always did; more lets every step whose needs are met start together, up to this many.
    max_parallel: int = 1
    # When a step fails for good while other branches still run: "finish" lets them finish (their
    # later steps start too), "stop" starts no further step. Either way the run then ends as the failed
    # step says and, with compensate_abandoned, what succeeded is undone.
    on_branch_failure: Literal["finish", "stop"] = "finish"

    def ready(self, snapshot: StateSnapshot) -> list[Step]:
        """The pending steps whose needs have all succeeded, in declaration order (none once a branch
        failed and the workflow stops on a branch failure)."""
        states = {s.name: s for s in snapshot.steps}
        if self.on_branch_failure == "stop" and any(s.status is StepStatus.failed for s in snapshot.steps):
            return []
        return [
            step
            for step in self.steps
            if (state := states.get(step.name)) is not None
            and state.status is StepStatus.pending
            and all(states[n].status is StepStatus.succeeded for n in step.needs if n in states)
        ]

    def room(self, snapshot: StateSnapshot) -> int:
        """How many more steps may start now (``max_parallel`` less those in flight)."""
        flying = sum(1 for s in snapshot.steps if s.status is StepStatus.dispatched)
        return max(0, self.max_parallel - flying)

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def has_children(self) -> bool:
        """Whether a step starts a child run (such a workflow is decided by the rules: see the loader)."""
        return any(s.workflow is not None for s in self.steps)

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def undo_pending(self, snapshot: StateSnapshot) -> bool:
        """An abandoned run (escalated after its deadline), one a person stopped (an approval denied, so
        it failed; or cancelled), or a fan-out with a failed branch, that created something it can undo."""
        abandoned = snapshot.status is RunStatus.escalated and snapshot.deadline_exceeded
        denied = snapshot.status is RunStatus.failed and any(
            a.status is ApprovalStatus.denied for a in snapshot.approvals
        )
        # A fan-out whose branch failed for good: the other branches' work is undone too (a run that
        # runs one step at a time keeps what it created and reports it, as it always did).
        branch_failed = (
            snapshot.status is RunStatus.failed
            and self.max_parallel > 1
            and any(s.status is StepStatus.failed for s in snapshot.steps)
        )
        # An operator cancelled it: undone as a run a person stopped is (``compensate_abandoned``).
        cancelled = snapshot.status is RunStatus.cancelled and snapshot.cancelled is not None
        if not (self.compensate_abandoned and (abandoned or denied or branch_failed or cancelled)):
            return False
        return any(
            s.status is StepStatus.succeeded and self.step(s.name).compensation is not None for s in snapshot.steps
        )


Workflows = Mapping[str, Workflow]


def lookup(workflows: Workflows, name: str) -> Workflow:
    try:
        return workflows[name]
    except KeyError:
        raise UnknownWorkflow(name, sorted(workflows)) from None


# -- loading ---------------------------------------------------------------------------------------
def workflow_dirs(directories: Path | str) -> list[Path]:
    """The folders of a ``workflows_dir`` value: one path, or several joined by ``os.pathsep``."""
    parts = str(directories).split(os.pathsep)
    if any(not part.strip() for part in parts):
        raise WorkflowError(
            directories, "workflows_dir", f"has an empty entry (folders are separated by {os.pathsep!r})"
        )
    return [Path(part) for part in parts]


def load_workflows(directories: Path | str) -> dict[str, Workflow]:
    """Every ``*.toml`` of every folder of ``directories`` (see ``workflow_dirs``), by workflow name.

    Folders are read in the order given, files by name; a workflow named twice, in one folder or in two,
    is refused naming both files: no folder silently shadows another, so which file a run follows never
    depends on the order of a variable. Raises ``WorkflowError`` on the first bad file or folder.
    """
    workflows: dict[str, Workflow] = {}
    for directory in workflow_dirs(directories):
        if not directory.is_dir():
            raise WorkflowError(directory, "workflows_dir", "is not a directory")
        for path in sorted(directory.glob("*.toml")):
            workflow = load_workflow(path)
            if workflow.name in workflows:
                first = workflows[workflow.name].source
                raise WorkflowError(path, "name", f"workflow {workflow.name!r} is declared in {first} already")
            workflows[workflow.name] = workflow
    if not workflows:
        raise WorkflowError(directories, "workflows_dir", "holds no *.toml workflow")
    check_children(workflows)
    return workflows


def check_children(workflows: Mapping[str, Workflow]) -> None:
    """Every child workflow a step names exists, and no workflow starts itself through its children (a
    run would start runs without end). Raises ``WorkflowError`` naming the file and the step."""
    for workflow in workflows.values():
        for step in workflow.steps:
            if step.workflow is not None and step.workflow not in workflows:
                known = ", ".join(sorted(workflows))
                raise WorkflowError(
                    workflow.source,
                    f"steps.{step.name}.workflow",
                    f"unknown workflow {step.workflow!r} (known: {known})",
                )

    def visit(name: str, path: tuple[tuple[str, str], ...]) -> None:
        for step in workflows[name].steps:
            if step.workflow is None:
                continue
            trail = (*path, (name, step.name))
            if step.workflow == trail[0][0]:
                first, first_step = trail[0]
                chain = " -> ".join([*(w for w, _ in trail), step.workflow])
                raise WorkflowError(
                    workflows[first].source, f"steps.{first_step}.workflow", f"a cycle of child workflows: {chain}"
                )
            if step.workflow not in {w for w, _ in trail}:
                visit(step.workflow, trail)

    for name in sorted(workflows):
        visit(name, ())


def load_workflow(path: Path) -> Workflow:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise WorkflowError(path, "toml", str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(path, "file", str(exc)) from None
    return _Loader(path).workflow(data)


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, reason: str) -> WorkflowError:
        return WorkflowError(self.path, where, reason)

    def keys(self, table: Mapping[str, Any], where: str, allowed: set[str], required: set[str]) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(f"{where}{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
        for key in sorted(required):
            if key not in table:
                raise self.fail(f"{where}{key}", "is required")

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.fail(where, f"must be a name of lowercase letters, digits, '-' or '_', not {value!r}")
        return value

    def workflow(self, data: dict[str, Any]) -> Workflow:
        self.keys(
            data,
            "",
            {
                "name",
                "goal",
                "tools",
                "steps",
                "compensate_abandoned",
                "decider",
                "fallback",
                "planner",
                "max_tokens_per_run",
                "max_cost_usd_per_run",
                "max_parallel",
                "on_branch_failure",
            },
            {"name", "goal", "tools", "steps"},
        )
        name = self.name(data["name"], "name")
        if name != self.path.stem:
            raise self.fail("name", f"{name!r} must match the file name {self.path.stem!r}")
        goal = data["goal"]
        if not isinstance(goal, str) or not goal.strip():
            raise self.fail("goal", "must be non-empty text")
        tools = data["tools"]
        if not isinstance(tools, list) or not tools:
            raise self.fail("tools", "must be a non-empty list of tool names")
        tools = [self.name(t, f"tools[{i}]") for i, t in enumerate(tools)]
        compensate = data.get("compensate_abandoned", True)
        if not isinstance(compensate, bool):
            raise self.fail("compensate_abandoned", "must be true or false")
        decider = data.get("decider")
        if decider is not None and decider not in ("rules", "llm"):
            raise self.fail("decider", f"must be 'rules' or 'llm', not {decider!r}")
        fallback = data.get("fallback", "rules")
        if fallback not in ("rules", "escalate"):
            raise self.fail("fallback", f"must be 'rules' or 'escalate', not {fallback!r}")
        planner = data.get("planner")
        if planner is not None and not isinstance(planner, bool):
            raise self.fail("planner", f"must be true or false, not {planner!r}")
        if planner and decider == "rules":
            raise self.fail("planner", "needs the llm decider: the rules make no use of a plan")
        max_tokens = data.get("max_tokens_per_run")
        # bool is an int in Python; `max_tokens_per_run = true` is a mistake, not a cap of 1.
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise self.fail("max_tokens_per_run", f"must be a whole number > 0, not {max_tokens!r}")
        max_cost = data.get("max_cost_usd_per_run")
        if max_cost is not None and (
            isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost > 0
        ):
            raise self.fail("max_cost_usd_per_run", f"must be a number of USD > 0, not {max_cost!r}")
        max_parallel = data.get("max_parallel", 1)
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or not 1 <= max_parallel <= 64:
            raise self.fail("max_parallel", f"must be a whole number from 1 to 64, not {max_parallel!r}")
        on_branch_failure = data.get("on_branch_failure", "finish")
        if on_branch_failure not in ("finish", "stop"):
            raise self.fail("on_branch_failure", f"must be 'finish' or 'stop', not {on_branch_failure!r}")
        raw_steps = data["steps"]
        if not isinstance(raw_steps, list) or not raw_steps or not all(isinstance(s, dict) for s in raw_steps):
            raise self.fail("steps", "must be a non-empty array of tables ([[steps]])")
        steps: list[Step] = []
        for index, raw in enumerate(raw_steps):
            steps.append(self.step(raw, index, steps, set(tools)))
        child = next((s for s in steps if s.workflow is not None), None)
        if child is not None and decider == "llm":
            # The model is offered tools, and a child run is none: it could never start the step.
            raise self.fail(
                "decider", f"step {child.name!r} starts a child workflow: such a workflow is decided by the rules"
            )
        return Workflow(
            name=name,
            steps=tuple(steps),
            goal=goal,
            tools=tuple(tools),
            compensate_abandoned=compensate,
            source=str(self.path),
            decider=decider,
            fallback=fallback,
            planner=planner,
            max_tokens_per_run=max_tokens,
            max_cost_usd_per_run=float(max_cost) if max_cost is not None else None,
            max_parallel=max_parallel,
            on_branch_failure=on_branch_failure,
        )

    def step(self, raw: dict[str, Any], index: int, earlier: list[Step], tools: set[str]) -> Step:
        where = f"steps[{index}]."
        allowed = {"name", "tool", "workflow", "needs", "args", "on_failure", "compensate", "reads", "writes"}
        self.keys(raw, where, allowed, {"name"})
        name = self.name(raw["name"], where + "name")
        if name in {s.name for s in earlier}:
            raise self.fail(where + "name", f"step {name!r} is declared twice")
        where = f"steps.{name}."
        if ("tool" in raw) == ("workflow" in raw):
            raise self.fail(where + "tool", "a step names exactly one of tool (a call) or workflow (a child run)")
        # A child workflow's step: whether the workflow exists (and no cycle) is checked once every file is read.
        child = self.name(raw["workflow"], where + "workflow") if "workflow" in raw else None
        tool = child_tool(child) if child is not None else self.tool(raw["tool"], where + "tool", tools)
        needs = raw.get("needs", [])
        if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
            raise self.fail(where + "needs", "must be a list of step names")
        declared = {s.name for s in earlier}
        for need in needs:
            if need not in declared:
                raise self.fail(where + "needs", f"{need!r} is not a step declared before {name!r}")
        on_failure = raw.get("on_failure", "fail")
        if on_failure not in ("fail", "escalate"):
            raise self.fail(where + "on_failure", f"must be 'fail' or 'escalate', not {on_failure!r}")
        reads = self.reads(raw.get("reads", []), where + "reads", set(needs))
        entities = {r.entity for r in reads}
        args = self.arguments(raw.get("args", {}), where + "args", set(needs), entities)
        compensation = None
        if "compensate" in raw:
            comp = raw["compensate"]
            if not isinstance(comp, dict):
                raise self.fail(where + "compensate", "must be a table with tool and args")
            self.keys(comp, where + "compensate.", {"tool", "args"}, {"tool"})
            compensation = Compensation(
                self.tool(comp["tool"], where + "compensate.tool", tools),
                # An undo may use what its own step produced.
                self.arguments(comp.get("args", {}), where + "compensate.args", {*needs, name}),
            )
        writes = self.writes(raw.get("writes", {}), where + "writes", {*needs, name})
        return Step(name, tool, args, tuple(needs), on_failure, compensation, reads, writes, child)

    def writes(self, raw: Any, where: str, visible: set[str]) -> tuple[Write, ...]:
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a table: writes.<entity>.key and writes.<entity>.set.<field>")
        out = []
        for entity, spec in raw.items():
            at = f"{where}.{entity}"
            if not _NAME.match(entity):
                raise self.fail(at, f"{entity!r}: an entity is a name of lowercase letters, digits, '-' or '_'")
            if not isinstance(spec, dict):
                raise self.fail(at, "must be a table with key and set")
            self.keys(spec, at + ".", {"key", "set"}, {"key", "set"})
            if not isinstance(spec["key"], str) or not isinstance(spec["set"], dict) or not spec["set"]:
                raise self.fail(at, "key must be a template and set a table of field = template")
            out.append(
                Write(
                    entity,
                    self.template(spec["key"], at + ".key", visible),
                    self.arguments(spec["set"], at + ".set", visible),
                )
            )
        return tuple(out)

    def reads(self, raw: Any, where: str, visible: set[str]) -> tuple[Read, ...]:
        if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
            raise self.fail(where, 'must be a list of "entity:{key template}" texts')
        reads: list[Read] = []
        for i, text in enumerate(raw):
            entity, sep, key = text.partition(":")
            if not sep or not key:
                raise self.fail(
                    f"{where}[{i}]",
                    f'{text!r}: write "entity:{{key template}}", e.g. "contact:{{request.company_domain}}"',
                )
            if not _NAME.match(entity):
                raise self.fail(
                    f"{where}[{i}]", f"{entity!r}: an entity is a name of lowercase letters, digits, '-' or '_'"
                )
            if entity in {r.entity for r in reads}:
                raise self.fail(f"{where}[{i}]", f"the step reads {entity!r} twice")
            reads.append(Read(entity, self.template(key, f"{where}[{i}]", visible)))
        return tuple(reads)

    def tool(self, value: Any, where: str, tools: set[str]) -> str:
        tool = self.name(value, where)
        if tool not in tools:
            raise self.fail(where, f"tool {tool!r} is not in the workflow's tools ({', '.join(sorted(tools))})")
        return tool

    def arguments(self, raw: Any, where: str, visible: set[str], entities: Collection[str] = ()) -> Arguments:
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a table of argument = template")
        values = []
        for key, value in raw.items():
            if isinstance(value, str):
                values.append((key, self.template(value, f"{where}.{key}", visible, entities)))
            elif isinstance(value, (dict, list)):
                raise self.fail(f"{where}.{key}", "must be text, a number or a boolean")
            else:
                values.append((key, value))
        return Arguments(tuple(values))

    def template(self, text: str, where: str, visible: set[str], entities: Collection[str] = ()) -> Template:
        parts: list[str | Placeholder] = []
        last = 0
        for match in _PLACEHOLDER.finditer(text):
            literal = text[last : match.start()]
            last = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                literal += token[0]
            elif match.group(1) is None:
                raise self.fail(
                    where, f"unbalanced {token!r} at character {match.start()} (write {token * 2} for a literal)"
                )
            if literal:
                parts.append(literal)
            if match.group(1) is not None:
                parts.append(self.placeholder(match.group(1), where, visible, entities))
        if text[last:]:
            parts.append(text[last:])
        merged: list[str | Placeholder] = []
        for part in parts:
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            else:
                merged.append(part)
        return Template(tuple(merged) or ("",))

    def placeholder(self, inner: str, where: str, visible: set[str], entities: Collection[str]) -> Placeholder:
        path_text, *filters = (p.strip() for p in inner.split("|"))
        shown = "{" + inner + "}"
        path = self.place(path_text, shown, where, visible, entities)
        default, run_key = None, False
        alternatives: list[tuple[str, ...]] = []
        for item in filters:
            name, _, arg = item.partition(":")
            name = name.strip()
            if name == "default" and _:
                default = arg.strip()
            elif name == "or" and _:
                alternatives.append(self.place(arg.strip(), shown, where, visible, entities))
            elif name == "run_key" and not _:
                run_key = True
            else:
                raise self.fail(
                    where, f"{shown}: unknown filter {item!r} (known: or: <path>, default: <text>, run_key)"
                )
        return Placeholder(path, default, run_key, tuple(alternatives))

    def place(
        self, path_text: str, shown: str, where: str, visible: set[str], entities: Collection[str]
    ) -> tuple[str, ...]:
        path = tuple(path_text.split("."))
        if path[0] == "memory":
            if len(path) < 3:
                raise self.fail(where, f"{shown}: write memory.<entity>.<field>")
            if path[1] not in entities:
                raise self.fail(where, f"{shown}: the step does not read {path[1]!r} (add it to the step's reads)")
            return path
        if path[0] == "request":
            if len(path) != 2 or path[1] not in _REQUEST_FIELDS:
                fields = ", ".join(sorted(_REQUEST_FIELDS))
                raise self.fail(where, f"{shown}: request has no field {'.'.join(path[1:])!r} (fields: {fields})")
        elif path[0] == "run":
            if path != ("run", "id"):
                raise self.fail(where, f"{shown}: the run offers only run.id")
        elif path[0] == "steps":
            if len(path) < 3 or path[2] != "output":
                raise self.fail(where, f"{shown}: write steps.<step>.output[.<key>...]")
            if path[1] not in visible:
                raise self.fail(where, f"{shown}: step {path[1]!r} is not in this step's needs")
        else:
            raise self.fail(where, f"{shown}: a path starts with request., run., steps. or memory., not {path[0]!r}")
        return path


@lru_cache(maxsize=1)
def default_workflows() -> Workflows:
    """The workflows of the repository's ``workflows/`` (the settings' default)."""
    from streamagent.config import DEFAULT_WORKFLOWS_DIR

    return load_workflows(DEFAULT_WORKFLOWS_DIR)


def __getattr__(name: str) -> Any:
    # ONBOARDING: the default workflow, read on first use (not at import, so that a bad file is
    # reported by whoever loads it, with its file, field and reason).
    if name == "ONBOARDING":
        return default_workflows()[DEFAULT_WORKFLOW]
    raise AttributeError(name)
