"""Decision replay: ask a candidate decider what it would have decided on recorded snapshots, and diff.

Side effects are off by construction: nothing here holds a producer, so no command, decision or event
can reach a topic; the candidate's workflows are read from a directory of the operator's choosing; a
model candidate gets a plan ledger that keeps plans in memory (the live ``run_plans`` are only read
through its spending query, never written). A model candidate does make real calls to the configured
endpoint: that is the point of asking it; ``--max-decisions`` bounds how many snapshots it is asked about.

Each recorded decision is re-decided with the inputs the live decision processor had for it, through
the live code path (processors/decision/gating.py): the decider, then the guard.

- The snapshot the live decider saw: read from ``agent.run.state`` by (run, version); a version the
  topic no longer holds (Apache Kafka compacts it) is re-derived by folding the run's events. It holds
  the run's approvals up to that decision (requested, granted, denied, expired), which the guard reads.
  A decision the processor made on waking a run that waited for a tool has no snapshot on any topic:
  its state is derived from the wait's, as the processor derives it (``woken.after_wait``).
- The tool catalogue as it was at the decision's moment (``registry.RegistryHistory``): which tools had
  a live member, their input schemas, which declare that every call needs approval. When that is not
  known exactly (the registry compacted, or it disagrees with what the decision recorded it saw), the
  decision is not compared and the report says why: a guess would report differences that are not.
- The candidate's workflows (``--workflows``) and policy (``--policies``): the candidate. The guard
  judges at the decision's recorded moment, so wall-time budgets count as they did then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streamagent import codec, db
from streamagent.config import Settings, SettingsError, env_name
from streamagent.events import DecisionRecorded
from streamagent.memory import MemoryReader, no_memory
from streamagent.processors.decision.decider import Decider, Decision
from streamagent.processors.decision.gating import CatalogueInputs, catalogue_inputs, decide
from streamagent.processors.decision.llm.ledger import PlanRecord, RunLedger
from streamagent.processors.guard.stage import GuardStage
from streamagent.processors.workflow import load_workflows

from .memory import MemoryHistory, read_memory
from .registry import RegistryHistory, read_registry, saw_otherwise
from .snapshots import decided_on

KINDS = (
    "same",
    "different tool",
    "different arguments",
    "different outcome",
    "catalogue unknown",
    "memory unknown",
    "not re-decided",
)
# Not differences: decisions that were not compared, and why is reported.
NOT_COMPARED = ("catalogue unknown", "memory unknown", "not re-decided")
CANDIDATES = ("configured", "rules", "llm")


class UnknownRuns(ValueError):
    """``--runs`` names a run with no recorded decision (in the ``--since`` window): not "no difference"."""


class ReplayLedger(RunLedger):
    """A run's spending read from the live table; plans made during the replay stay in memory."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self.plans: dict[str, PlanRecord] = {}

    def plan(self, run_id: str) -> PlanRecord | None:
        return self.plans.get(run_id)

    def save_plan(self, record: PlanRecord) -> PlanRecord:
        return self.plans.setdefault(record.run_id, record)


def candidate_decider(
    settings: Settings, which: str, inputs: CatalogueInputs | None = None, memory: MemoryReader = no_memory
) -> Decider:
    """``rules``, ``llm`` (every run asks the model), or ``configured``: as the decision processor chooses
    per workflow; with ``settings.workflows_dir`` as the candidate's workflows, reading the catalogue
    through ``inputs`` (None: every tool available, no schema checked)."""
    from streamagent.processors.decision.choice import ChosenDecider
    from streamagent.processors.decision.rules import RulesDecider

    workflows = load_workflows(settings.workflows_dir)
    catalogue = (inputs.available, inputs.check) if inputs is not None else ()
    rules = RulesDecider(workflows, *catalogue, memory=memory)
    by_model = which == "llm" or any((w.decider or settings.decider) == "llm" for w in workflows.values())
    if which == "rules" or not by_model:
        return rules
    if not settings.openai_base_url:
        raise SettingsError(f"a model candidate needs {env_name('openai_base_url')}: the endpoint to ask")
    from streamagent.processors.decision.llm.decider import LlmDecider

    entries = (*catalogue, inputs.entry_of) if inputs is not None else ()
    llm = LlmDecider(settings, workflows, *entries, ledger=ReplayLedger(settings.database_url), memory=memory)
    if which == "llm":
        return llm
    return ChosenDecider(settings.decider, workflows, rules, llm)


@dataclass
class Candidate:
    """What re-decides: the decider and the guard, both reading the catalogue as of the decision at hand."""

    decider: Decider
    guard: GuardStage
    registry: RegistryHistory
    memory: MemoryHistory

    @property
    def policy_version(self) -> str:
        return self.guard.policies.current().version


def candidate(settings: Settings, which: str) -> Candidate:
    """The candidate of ``settings`` (its workflows and policies folders), over the registry's history."""
    registry = read_registry(settings)
    memory = read_memory(settings)
    inputs = catalogue_inputs(registry.entry_of)
    return Candidate(
        candidate_decider(settings, which, inputs, memory.current),
        GuardStage(settings, inputs.declared_approval),
        registry,
        memory,
    )


@dataclass
class Compared:
    run_id: str
    version: int
    kind: str
    recorded: DecisionRecorded
    candidate: Decision | None
    why: str | None = None  # why it was not compared

    def lines(self) -> list[str]:
        r, c = self.recorded, self.candidate
        got = (
            "no decision (waits for the next event)"
            if c is None
            else _describe(c.action.value, c.step, c.tool, c.arguments, c.reason)
        )
        return [
            f"{self.run_id} v{self.version}: {self.kind}",
            f"    recorded  [{r.decider}] {_describe(r.action.value, r.step, r.tool, r.arguments, r.reason)}",
            f"    candidate {'[' + (c.decider or '') + '] ' if c is not None and c.decider else ''}{got}",
        ]


@dataclass
class DecisionReport:
    compared: list[Compared] = field(default_factory=list)
    missing_snapshots: int = 0
    seconds: float = 0.0
    policy_version: str = ""  # the candidate's
    other_policies: dict[str, int] = field(default_factory=dict)  # recorded under another version: how many

    def counts(self) -> dict[str, int]:
        return {k: sum(1 for c in self.compared if c.kind == k) for k in KINDS}

    def differing(self) -> list[Compared]:
        return [c for c in self.compared if c.kind != "same" and c.kind not in NOT_COMPARED]

    def unknown(self) -> list[Compared]:
        return [c for c in self.compared if c.kind in ("catalogue unknown", "memory unknown")]


def _describe(action: str, step: str | None, tool: str | None, arguments: dict[str, Any], reason: str) -> str:
    import json

    target = f" {step}" + (f" → {tool}" if tool and tool != step else "") if step else ""
    args = f" {json.dumps(arguments, sort_keys=True, default=str)}" if arguments else ""
    return f"{action}{target}{args} ({reason})"


def compare(recorded: DecisionRecorded, candidate: Decision | None) -> str:
    if candidate is None or candidate.action != recorded.action:
        return "different outcome"
    if (candidate.step, candidate.tool) != (recorded.step, recorded.tool):
        return "different tool"
    if candidate.arguments != recorded.arguments:
        return "different arguments"
    # A fan-out: the further steps it started, each with its tool and arguments.
    theirs = [(p.step, p.tool, p.arguments) for p in recorded.parallel]
    ours = [(d.step, d.tool, d.arguments) for d in candidate.parallel]
    if [s[:2] for s in ours] != [s[:2] for s in theirs]:
        return "different tool"
    if ours != theirs:
        return "different arguments"
    return "same"


def recorded_decisions(settings: Settings, runs: list[str] | None, since: datetime | None) -> list[DecisionRecorded]:
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT decision_event FROM decisions WHERE (%(runs)s::text[] IS NULL OR run_id = ANY(%(runs)s))"
            " AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
            " ORDER BY created_at, run_id, based_on_version",
            {"runs": runs, "since": since},
        ).fetchall()
    out = []
    for (event,) in rows:
        record = codec.decode(bytes(event))
        assert isinstance(record, DecisionRecorded)
        out.append(record)
    return out


def replay_decisions(
    settings: Settings,
    candidate: Candidate,
    runs: list[str] | None = None,
    since: datetime | None = None,
    limit: int | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> DecisionReport:
    started = time.monotonic()
    report = DecisionReport(policy_version=candidate.policy_version)
    records = recorded_decisions(settings, runs, since)
    unknown = sorted(set(runs or ()) - {r.run_id for r in records})
    if unknown:  # before asking anything: a model candidate's calls cost money
        raise UnknownRuns(f"--runs: no decision recorded for run {', '.join(unknown)} (nothing to re-decide for it)")
    snaps = decided_on(settings, records)
    registry = candidate.registry
    for i, record in enumerate(records):
        key = (record.run_id, record.based_on_version)
        snap = snaps.get(key)
        if snap is None or (limit is not None and i >= limit):
            report.missing_snapshots += snap is None
            why = "no snapshot: neither the topic nor the log held it" if snap is None else "past --max-decisions"
            report.compared.append(Compared(*key, "not re-decided", record, None, why))
            continue
        registry.move_to(record.occurred_at)
        unknown = registry.unknown_at(record.occurred_at) or saw_otherwise(record, registry.entry_of)
        if unknown is not None:
            report.compared.append(Compared(*key, "catalogue unknown", record, None, unknown))
            continue
        forgotten = candidate.memory.move_to(record)  # the entity versions this decision read
        if forgotten is not None:
            report.compared.append(Compared(*key, "memory unknown", record, None, forgotten))
            continue
        if record.policy_version and record.policy_version != report.policy_version:
            report.other_policies[record.policy_version] = report.other_policies.get(record.policy_version, 0) + 1
        # As live: the decider, then the guard, judging at the decision's moment (budgets of wall time).
        _, verdict = decide(candidate.decider, candidate.guard, snap, record.occurred_at)
        decision = verdict.decision if verdict is not None else None
        report.compared.append(Compared(*key, compare(record, decision), record, decision))
        if progress is not None:
            progress("re-decide", i + 1, len(records))
    report.seconds = time.monotonic() - started
    return report
