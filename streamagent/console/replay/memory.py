"""Shared memory as a decision read it: every version the memory topic holds, by entity and version.

A recorded decision names the version of each entity it read (``DecisionRecorded.memory``); a replay
re-decides it with exactly those versions. An entity the recorded decision did not read (a candidate
workflow that reads more) is taken as it was at the decision's moment: its last version applied then.
When a version the decision read is no longer on the topic (compacted away on Apache Kafka), the
decision is not compared and the report says so, as for a catalogue not known exactly.
"""

from __future__ import annotations

import bisect
from datetime import datetime

from streamagent import codec
from streamagent.config import Settings
from streamagent.errors import DecodeError
from streamagent.events import DecisionRecorded, EntityVersion
from streamagent.kafka import admin
from streamagent.topics import MEMORY

from .sections import Difference, Section, read_last
from .source import whole_topic


class MemoryHistory:
    """``move_to(decision)`` sets what ``current(ref)`` answers: the entity as that decision read it."""

    def __init__(self, versions: list[EntityVersion]) -> None:
        self.by_ref: dict[str, dict[int, EntityVersion]] = {}
        self.timeline: dict[str, list[tuple[datetime, int]]] = {}
        for v in versions:
            self.by_ref.setdefault(v.ref, {})[v.version] = v
        for ref, found in self.by_ref.items():
            self.timeline[ref] = sorted((v.as_of, v.version) for v in found.values())
        self._read: dict[str, int] = {}
        self._at: datetime | None = None

    def move_to(self, record: DecisionRecorded) -> str | None:
        """Take ``record``'s reads; why it cannot be re-decided exactly (a version no longer held), or None."""
        self._read, self._at = dict(record.memory), record.occurred_at
        gone = [f"{ref} v{v}" for ref, v in sorted(record.memory.items()) if v and v not in self.by_ref.get(ref, {})]
        return f"memory no longer holds {', '.join(gone)} (compacted)" if gone else None

    def current(self, ref: str) -> EntityVersion | None:
        if ref in self._read:
            version = self._read[ref]
            found = self.by_ref.get(ref, {}).get(version) if version else None
        else:  # not read by the recorded decision: as it was at that moment
            times = self.timeline.get(ref, [])
            index = bisect.bisect_right(times, (self._at, 1 << 62)) if self._at is not None else len(times)
            found = self.by_ref[ref][times[index - 1][1]] if index else None
        return None if found is None or found.deleted else found


def read_memory(settings: Settings, timeout_s: float = 120.0) -> MemoryHistory:
    topic = settings.topic(MEMORY)
    meta = admin(settings).list_topics(timeout=10).topics.get(topic)
    versions: list[EntityVersion] = []
    if meta is not None:
        for msg in whole_topic(settings, topic, sorted(meta.partitions), "replay.memory", timeout_s):
            try:
                version = codec.decode(msg.value())
            except DecodeError:
                continue  # the projection dead-letters what it cannot read; nothing to re-decide from
            if isinstance(version, EntityVersion):
                versions.append(version)
    return MemoryHistory(versions)


def verify_memory(settings: Settings, timeout_s: float = 120.0) -> Section:
    """The memory table rebuilt from the admitted writes (``agent.memory.writes``, each partition in order,
    through the memory processor's own ``apply`` and signature check) against the versions the memory
    processor published (``agent.memory``, the last per entity): version, fields and deletion must agree.
    ``behind``: a write the processor has not published yet (a running stack catching up)."""
    from streamagent.authn import Authenticator, Unauthenticated
    from streamagent.events import MemoryWrite, now
    from streamagent.processors.memory.apply import apply
    from streamagent.topics import MEMORY_WRITES

    section = Section("memory")
    authenticator = Authenticator.of(settings)
    rebuilt: dict[str, EntityVersion] = {}
    topic = settings.topic(MEMORY_WRITES)
    meta = admin(settings).list_topics(timeout=10).topics.get(topic)
    if meta is not None:
        for msg in whole_topic(settings, topic, sorted(meta.partitions), "replay.memory-writes", timeout_s):
            try:
                write = codec.decode(msg.value())
                if not isinstance(write, MemoryWrite):
                    continue
                authenticator.verify(write, msg.value(), msg.headers())
            except (DecodeError, Unauthenticated):
                continue  # refused live too (dead-lettered), so nothing to rebuild from it
            applied = apply(rebuilt.get(write.ref), write, now())
            if applied.outcome == "applied" and applied.version is not None:
                rebuilt[write.ref] = applied.version
    live: dict[str, EntityVersion | None] = {}
    for key, value in read_last(settings, settings.topic(MEMORY), timeout_s).items():
        decoded = codec.decode(value) if value is not None else None
        live[key.decode(errors="replace")] = decoded if isinstance(decoded, EntityVersion) else None
    for ref in sorted(set(rebuilt) | set(live)):
        mine, theirs = rebuilt.get(ref), live.get(ref, ...)
        if theirs is None:
            section.same += 1  # removed from the topic by a tombstone: gone for every reader
        elif theirs is ...:
            assert mine is not None
            section.found.append(Difference(ref, "behind", f"v{mine.version} not published yet"))
        elif mine is None:
            section.found.append(Difference(ref, "differ", f"v{theirs.version} published, no admitted write makes it"))
        elif (mine.version, mine.fields, mine.deleted) == (theirs.version, theirs.fields, theirs.deleted):
            section.same += 1
        elif mine.version > theirs.version:
            section.found.append(Difference(ref, "behind", f"rebuilt v{mine.version}, published v{theirs.version}"))
        else:
            section.found.append(
                Difference(
                    ref, "differ", f"rebuilt v{mine.version} {mine.fields}, published v{theirs.version} {theirs.fields}"
                )
            )
    return section
