"""Which decider decides a run: the one its workflow names, else the one the settings name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from streamagent.processors.decision.decider import Decider, Decision
from streamagent.processors.workflow import Workflows, every_tool_available

from streamagent.catalogue import ToolEntry
from streamagent.events import StateSnapshot

# A tool's live catalogue entry (its description and input schema), or None.
EntryOf = Callable[[str], ToolEntry | None]


class ChosenDecider:
    def __init__(
        self, default: str, workflows: Workflows, rules: Decider, llm: Decider, *, concurrency: int = 1
    ) -> None:
        self.name = default  # the label of the processor's metrics
        # How many runs the handler may decide at once (model calls in flight); the deciders are stateless.
        self.concurrency = concurrency
        # A decision may cost a model call: the handler looks for a recorded one even for a run's first
        # snapshot before asking (after a restart, a redelivered first snapshot costs no call).
        self.costly = True
        self.workflows = workflows
        self.by_name = {rules.name: rules, llm.name: llm}
        self.rules = rules.name
        # The handler wakes waiting runs with the deciders' view of the catalogue.
        self.available = getattr(rules, "available", every_tool_available)

    def decide(self, snapshot: StateSnapshot) -> Decision | None:
        workflow = self.workflows.get(snapshot.request.workflow)
        which = (workflow.decider if workflow is not None else None) or self.name
        if workflow is not None and workflow.has_children:
            which = self.rules  # a child step is no tool the model could call (processors/workflow.py)
        decision = self.by_name[which].decide(snapshot)
        # Recorded per decision: with per-workflow choice, one processor's decisions have two authors.
        return replace(decision, decider=decision.decider or which) if decision is not None else None
