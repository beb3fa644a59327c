"""What a step reads from shared memory, as a decision prepares it: the versions (recorded with the
decision and its command), the fields (for the arguments) and what the prepared context shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamagent.processors.workflow import Results, Step

from streamagent.events import StateSnapshot
from streamagent.memory import MemoryReader


@dataclass(frozen=True)
class Read:
    versions: dict[str, int] = field(default_factory=dict)  # ref -> version (0: memory has none)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # entity -> its fields, for templates
    shown: dict[str, Any] = field(default_factory=dict)  # ref -> version, as_of and fields, for the context


NOTHING = Read()


def read(step: Step, snapshot: StateSnapshot, results: Results, memory: MemoryReader) -> Read:
    """The entities ``step`` reads, as they are now (one lookup each)."""
    if not step.reads:
        return NOTHING
    versions: dict[str, int] = {}
    facts: dict[str, dict[str, Any]] = {}
    shown: dict[str, Any] = {}
    for entity, ref in step.read_refs(snapshot.request, results, snapshot.run_id).items():
        found = memory(ref)
        versions[ref] = found.version if found is not None else 0
        if found is not None:
            facts[entity] = dict(found.fields)
            shown[ref] = {"version": found.version, "as_of": found.as_of.isoformat(), "fields": found.fields}
        else:
            shown[ref] = {"version": 0, "fields": None}
    return Read(versions, facts, shown)
