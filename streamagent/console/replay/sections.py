"""What a verification reports: sections of sames and differences, and the last value per key of a topic."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamagent.config import Settings
from streamagent.kafka import admin

from .source import whole_topic

# How many differences are printed in full per section.
SHOWN = 5


@dataclass
class Difference:
    run_id: str
    kind: str  # differ | ahead | behind
    detail: str


@dataclass
class Section:
    name: str
    same: int = 0
    found: list[Difference] = field(default_factory=list)

    def of(self, kind: str) -> list[Difference]:
        return [d for d in self.found if d.kind == kind]


@dataclass
class Report:
    sections: list[Section]

    def count(self, kind: str) -> int:
        return sum(len(s.of(kind)) for s in self.sections)

    def clean(self, strict: bool) -> bool:
        """No difference; ``strict`` (a stopped stack): nothing ahead or behind either."""
        kinds = ("differ", "ahead", "behind") if strict else ("differ",)
        return not any(self.count(k) for k in kinds)

    def lines(self) -> list[str]:
        out = []
        for s in self.sections:
            counts = ", ".join(f"{len(s.of(k))} {k}" for k in ("differ", "behind", "ahead") if s.of(k))
            out.append(f"  {s.name:<12} {s.same} same" + (f", {counts}" if counts else ""))
            for kind in ("differ", "behind", "ahead"):
                for d in s.of(kind)[:SHOWN]:
                    out.append(f"    {kind:<6} {d.run_id}  {d.detail}")
                if len(s.of(kind)) > SHOWN:
                    out.append(f"    … and {len(s.of(kind)) - SHOWN} more {kind}")
        return out


def read_last(settings: Settings, topic: str, timeout_s: float = 120.0) -> dict[bytes, bytes | None]:
    """The last value per key of a topic, read to its end without a group (nothing committed)."""
    meta = admin(settings).list_topics(timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        return {}
    last: dict[bytes, bytes | None] = {}
    for msg in whole_topic(settings, topic, list(meta.partitions), "replay.verify", timeout_s):
        if msg.key() is not None:
            last[msg.key()] = msg.value()
    return last
