"""Decision replay: ask a candidate decider what it would have decided on recorded snapshots, and diff.

Side effects are off by construction: nothing here holds a producer, so no command, decision or event
can reach a topic; the candidate's workflows are read from a directory of the operator's choosing; a
model candidate gets a plan ledger that keeps plans in memory (the live ``run_plans`` are only read
through its spending query, never written). A model candidate does make real calls to the configured
endpoint: that is the point of asking it; ``--max-decisions`` bounds how many snapshots it is asked about.

The snapshots are the ones the live decider saw: read from ``agent.run.state`` by (run, version); a
version the topic no longer holds (Apache Kafka compacts it) is re-derived by folding the run's events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streamagent import codec, db
from streamagent.config import Settings, SettingsError, env_name
from streamagent.events import DecisionRecorded, StateSnapshot
from streamagent.kafka import admin
from streamagent.processors.decision.decider import Decider, Decision
from streamagent.processors.decision.llm.ledger import PlanRecord, RunLedger
from streamagent.processors.workflow import load_workflows
from streamagent.topics import RUN_STATE

from .rebuild import Scope, rebuild
from .source import whole_topic

KINDS = ("same", "different tool", "different arguments", "different outcome", "not re-decided")
CANDIDATES = ("configured", "rules", "llm")


class ReplayLedger(RunLedger):
    """A run's spending read from the live table; plans made during the replay stay in memory."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self.plans: dict[str, PlanRecord] = {}

    def plan(self, run_id: str) -> PlanRecord | None:
        return self.plans.get(run_id)

    def save_plan(self, record: PlanRecord) -> PlanRecord:
        return self.plans.setdefault(record.run_id, record)


def candidate_decider(settings: Settings, which: str) -> Decider:
    """``rules``, ``llm`` (every run asks the model), or ``configured``: as the decision processor chooses
    per workflow; with ``settings.workflows_dir`` as the candidate's workflows."""
    from streamagent.processors.decision.choice import ChosenDecider
    from streamagent.processors.decision.rules import RulesDecider

    workflows = load_workflows(settings.workflows_dir)
    rules = RulesDecider(workflows)
    by_model = which == "llm" or any((w.decider or settings.decider) == "llm" for w in workflows.values())
    if which == "rules" or not by_model:
        return rules
    if not settings.openai_base_url:
        raise SettingsError(f"a model candidate needs {env_name('openai_base_url')}: the endpoint to ask")
    from streamagent.processors.decision.llm.decider import LlmDecider

    llm = LlmDecider(settings, workflows, ledger=ReplayLedger(settings.database_url))
    if which == "llm":
        return llm
    return ChosenDecider(settings.decider, workflows, rules, llm)


@dataclass
class Compared:
    run_id: str
    version: int
    kind: str
    recorded: DecisionRecorded
    candidate: Decision | None

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

    def counts(self) -> dict[str, int]:
        return {k: sum(1 for c in self.compared if c.kind == k) for k in KINDS}

    def differing(self) -> list[Compared]:
        return [c for c in self.compared if c.kind not in ("same", "not re-decided")]


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


def snapshots(
    settings: Settings, wanted: set[tuple[str, int]], timeout_s: float = 120.0
) -> dict[tuple[str, int], StateSnapshot]:
    """Every (run, version) of ``wanted`` the snapshot topic still holds."""
    topic = settings.topic(RUN_STATE)
    meta = admin(settings).list_topics(timeout=10).topics.get(topic)
    found: dict[tuple[str, int], StateSnapshot] = {}
    if meta is None or not wanted:
        return found
    runs = {r.encode() for r, _ in wanted}
    # A snapshot compaction removed is re-derived by the caller: what was read by the deadline is enough.
    for msg in whole_topic(settings, topic, list(meta.partitions), "replay.decisions", timeout_s, to_the_end=False):
        if msg.key() not in runs:
            continue
        snap = codec.decode(msg.value())
        if isinstance(snap, StateSnapshot) and (snap.run_id, snap.version) in wanted:
            found[(snap.run_id, snap.version)] = snap
    return found


def replay_decisions(
    settings: Settings,
    candidate: Decider,
    runs: list[str] | None = None,
    since: datetime | None = None,
    limit: int | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> DecisionReport:
    started = time.monotonic()
    report = DecisionReport()
    records = recorded_decisions(settings, runs, since)
    wanted = {(r.run_id, r.based_on_version) for r in records}
    snaps = snapshots(settings, wanted)
    lost = {run_id for run_id, version in wanted if (run_id, version) not in snaps}
    if lost:  # compacted away: fold those runs again for the snapshots they published
        folded = rebuild(settings, Scope(runs=frozenset(lost)), project=False)
        for run_id, versions in folded.snapshots.items():
            for version, snap in versions.items():
                if (run_id, version) in wanted:
                    snaps.setdefault((run_id, version), snap)
    for i, record in enumerate(records):
        snap = snaps.get((record.run_id, record.based_on_version))
        if snap is None or (limit is not None and i >= limit):
            report.missing_snapshots += snap is None
            report.compared.append(Compared(record.run_id, record.based_on_version, "not re-decided", record, None))
            continue
        decision = candidate.decide(snap)
        report.compared.append(
            Compared(record.run_id, record.based_on_version, compare(record, decision), record, decision)
        )
        if progress is not None:
            progress("re-decide", i + 1, len(records))
    report.seconds = time.monotonic() - started
    return report
