"""The live tool catalogue: a table built from the registry topic, never from a list in code.

Every tool process (a *member* of its tool's consumer group) announces itself on the compacted
registry topic, keyed ``<tool>/<member id>``: ``up`` at start, again every ``registry_heartbeat_s``
(the heartbeat), ``left`` on a graceful stop. A member is live while its last announcement is younger
than its lease (``lease_ms``, carried in the announcement: ``registry_lease_heartbeats`` heartbeats). A
tool is ``available`` while it has a live member, ``unavailable`` otherwise; its definition (schemas,
description, version) stays in the table either way. A ``left`` announcement is a value, not a
tombstone, so that compaction keeps the definition of a tool that is not running.

Ownership of a name. Two tools may announce the same name; a name belongs to one input schema, the
schema of the *first-started member that is still live* (or, with no live member, the last owner's):

- the first announcement of a name makes its schema the owner;
- an announcement with a *different* input schema is refused (logged once per member) while the
  owner has a live member that started earlier; the owner keeps the name;
- once the owner has no live member (all left, or their leases ran out), the next announcement with
  another schema takes the name over. That is how an incompatible version is deployed: stop the old
  one, start the new one. A member restarted with the old schema is then refused in turn.

"First" is judged by the members' start times (``started_at_ms``), not by the order of messages on the
topic, because compaction reorders a member's surviving announcement behind its rivals'.

Liveness inside the fold is judged on the announcements' own clocks (``at_ms``), so the fold is pure
and a cold read of the topic reaches the same table as a reader that followed it live. Status is
judged against the reader's wall clock (one clock per machine here; across machines, keep them in NTP).

A registry message that does not decode is refused with a reason (dead-lettered when the catalogue has
a ``DeadLetterSink``) and the table keeps its last good entry. An announcement in the old format (a
JSON object keyed by the tool name, no member) still describes the tool, with no member.

Usage: ``Catalogue(settings).load()`` for a one-shot read (the CLI); ``start()`` for a table kept up to
date by a background thread, or ``poll(timeout)`` from a processor's own loop. ``available(name)``
answers with the tool's ``ToolEntry`` or ``None``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Protocol

from confluent_kafka import Consumer, KafkaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamagent.config import Settings
from streamagent.kafka import table_reader
from streamagent.topics import TOOL_REGISTRY

log = logging.getLogger(__name__)

MAX_ANNOUNCEMENT_BYTES = 1024 * 1024


class Announcement(BaseModel):
    """One registry message. The first six fields are the original (member-less) announcement."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # newer writers may add fields

    name: str = Field(min_length=1, pattern=r"^[a-z][a-z0-9_-]*$")
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    requires_approval: bool = False
    version: str = "1"
    # Added with the live catalogue; absent in the original format.
    member_id: str | None = None
    state: Literal["up", "left"] = "up"
    at_ms: int | None = None  # when the member sent it (epoch ms)
    started_at_ms: int | None = None
    lease_ms: int | None = None
    timeout_s: float | None = None
    retry: dict[str, Any] | None = None

    def key(self) -> bytes:
        return registry_key(self.name, self.member_id)

    def encode(self) -> bytes:
        # Not key-sorted: a schema's properties keep the model's field order (``schema_fingerprint`` sorts).
        return json.dumps(self.model_dump(mode="json")).encode()

    @cached_property
    def schema_fingerprint(self) -> str:
        # Cached: the decision processor reads it on every catalogue check (several per decision), and
        # sorting and hashing the schema each time was 8% of its CPU. The model is frozen, so it cannot go stale.
        return schema_fingerprint(self.input_schema)


def registry_key(name: str, member_id: str | None) -> bytes:
    return (f"{name}/{member_id}" if member_id else name).encode()


def schema_fingerprint(schema: dict[str, Any]) -> str:
    """Stable id of a JSON Schema: the same schema gives the same id whatever its key order."""
    return hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class Undecodable(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode(key: bytes | None, value: bytes | None) -> Announcement | None:
    """A registry message as an announcement; ``None`` for a tombstone. Raises ``Undecodable``."""
    if value is None:
        return None
    if len(value) > MAX_ANNOUNCEMENT_BYTES:
        raise Undecodable("oversized", f"{len(value)} bytes > {MAX_ANNOUNCEMENT_BYTES}")
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Undecodable("not-json", repr(exc)[:300]) from exc
    if not isinstance(data, dict):
        raise Undecodable("invalid-announcement", f"expected a JSON object, got {type(data).__name__}")
    try:
        announcement = Announcement.model_validate(data)
    except ValidationError as exc:
        raise Undecodable("invalid-announcement", str(exc)[:1000]) from exc
    if key is not None and key != announcement.key():
        raise Undecodable("key-mismatch", f"key {key!r} does not name {announcement.key()!r}")
    return announcement


# -- the table -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemberView:
    member_id: str
    version: str
    last_seen_ms: int
    started_at_ms: int | None


@dataclass(frozen=True)
class ToolEntry:
    """What the decision layer needs to know of one tool."""

    name: str
    version: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    requires_approval: bool
    status: Literal["available", "unavailable"]
    members: tuple[MemberView, ...]  # live members only
    schema_fingerprint: str
    timeout_s: float | None = None
    retry: dict[str, Any] | None = None
    refused: tuple[str, ...] = ()  # live members announcing this name with another input schema

    @property
    def available(self) -> bool:
        return self.status == "available"

    def summary(self) -> dict[str, Any]:
        """JSON-ready view (for ``streamagent tools --json``)."""
        return {
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "requires_approval": self.requires_approval,
            "description": self.description,
            "members": [
                {"member_id": m.member_id, "version": m.version, "last_seen_ms": m.last_seen_ms} for m in self.members
            ],
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
            "schema_fingerprint": self.schema_fingerprint,
            "timeout_s": self.timeout_s,
            "retry": self.retry,
            "refused_members": list(self.refused),
        }


@dataclass
class _Member:
    version: str
    last_seen_ms: int
    lease_ms: int
    started_at_ms: int | None

    def live(self, now_ms: int) -> bool:
        return now_ms < self.last_seen_ms + self.lease_ms


@dataclass
class _Tool:
    definition: Announcement
    members: dict[str, _Member] = field(default_factory=dict)
    refused: dict[str, _Member] = field(default_factory=dict)  # members of other schemas, kept out

    def live(self, now_ms: int) -> bool:
        return any(m.live(now_ms) for m in self.members.values())


@dataclass(frozen=True)
class Applied:
    """What one message did to the table: ``ok``, ``refused`` (name owned), or ``rejected`` (undecodable)."""

    outcome: Literal["ok", "refused", "rejected", "ignored"]
    reason: str = ""
    detail: str = ""


class CatalogueState:
    """The pure fold: registry messages in, a table out. No Kafka, no threads, no wall clock."""

    def __init__(self, default_lease_ms: int = 15_000) -> None:
        self.default_lease_ms = default_lease_ms
        self._tools: dict[str, _Tool] = {}

    def apply(self, key: bytes | None, value: bytes | None, *, received_ms: int | None = None) -> Applied:
        """Fold one message. ``received_ms`` dates announcements that carry no ``at_ms`` (old format)."""
        try:
            announcement = decode(key, value)
        except Undecodable as exc:
            return Applied("rejected", exc.reason, exc.detail)
        if announcement is None:
            return self._tombstone(key)
        return self.announce(announcement, received_ms=received_ms)

    def announce(self, a: Announcement, *, received_ms: int | None = None) -> Applied:
        now = a.at_ms if a.at_ms is not None else (received_ms or 0)
        tool = self._tools.get(a.name)
        if tool is None:
            tool = self._tools[a.name] = _Tool(a)
        elif a.schema_fingerprint != tool.definition.schema_fingerprint:
            if a.member_id is not None:  # a member has one schema at a time: this supersedes its last one
                tool.members.pop(a.member_id, None)
            if a.member_id is None or a.state == "left" or self._owner_keeps(tool, a, now):
                return self._refuse(tool, a, now)
            log.warning(
                "tool %s: the input schema of version %s takes the name over from version %s",
                a.name,
                a.version,
                tool.definition.version,
                extra={"tool": a.name, "member_id": a.member_id, "version": a.version},
            )
            # The old owner's live members are now the ones kept out.
            refused = {**tool.refused, **{k: m for k, m in tool.members.items() if m.live(now)}}
            refused.pop(a.member_id, None)
            tool = self._tools[a.name] = _Tool(a, refused=refused)
        if a.member_id is None:  # the original format: a definition without a member
            tool.definition = a
            return Applied("ok")
        tool.refused.pop(a.member_id, None)
        if a.state == "left":
            tool.members.pop(a.member_id, None)
            return Applied("ok")
        tool.definition = a  # the newest announcement of the owning schema describes the tool
        tool.members[a.member_id] = _Member(a.version, now, a.lease_ms or self.default_lease_ms, a.started_at_ms)
        return Applied("ok")

    @staticmethod
    def _owner_keeps(tool: _Tool, a: Announcement, now: int) -> bool:
        """The owner keeps its name against ``a`` while one of its live members started before ``a``'s."""
        started = [m.started_at_ms or m.last_seen_ms for m in tool.members.values() if m.live(now)]
        if not started:
            return False
        challenger = a.started_at_ms if a.started_at_ms is not None else now
        return min(started) <= challenger

    def _refuse(self, tool: _Tool, a: Announcement, now: int) -> Applied:
        detail = (
            f"tool {a.name} is owned by version {tool.definition.version} (input schema"
            f" {tool.definition.schema_fingerprint}); member {a.member_id} version {a.version} announces input"
            f" schema {a.schema_fingerprint}"
        )
        member = a.member_id or "?"
        if a.state == "left":
            tool.refused.pop(member, None)
            return Applied("ignored", "name-owned", detail)
        if member not in tool.refused:  # logged once per member, not once per heartbeat
            log.error("refused tool announcement: %s", detail, extra={"tool": a.name, "member_id": a.member_id})
        tool.refused[member] = _Member(a.version, now, a.lease_ms or self.default_lease_ms, a.started_at_ms)
        return Applied("refused", "name-owned", detail)

    def _tombstone(self, key: bytes | None) -> Applied:
        name, _, member = (key or b"").decode(errors="replace").partition("/")
        tool = self._tools.get(name)
        if tool is not None and member:
            tool.members.pop(member, None)
            tool.refused.pop(member, None)
        return Applied("ok" if tool is not None else "ignored")

    # -- reading ---------------------------------------------------------------------------------------
    def entry(self, name: str, now_ms: int) -> ToolEntry | None:
        tool = self._tools.get(name)
        if tool is None:
            return None
        d = tool.definition
        live = sorted(
            (
                MemberView(mid, m.version, m.last_seen_ms, m.started_at_ms)
                for mid, m in tool.members.items()
                if m.live(now_ms)
            ),
            key=lambda m: m.member_id,
        )
        return ToolEntry(
            name=d.name,
            version=d.version,
            description=d.description,
            input_schema=d.input_schema,
            output_schema=d.output_schema,
            requires_approval=d.requires_approval,
            status="available" if live else "unavailable",
            members=tuple(live),
            schema_fingerprint=d.schema_fingerprint,
            timeout_s=d.timeout_s,
            retry=d.retry,
            refused=tuple(sorted(mid for mid, m in tool.refused.items() if m.live(now_ms))),
        )

    def entries(self, now_ms: int) -> list[ToolEntry]:
        return [e for name in sorted(self._tools) if (e := self.entry(name, now_ms)) is not None]


class ToolCatalogue(Protocol):
    """What a consumer of the catalogue (the decision layer) needs; ``Catalogue`` is the Kafka-fed one.

    ``available`` is ``None`` for a tool never announced and for one with no live member; ``entries``
    lists every known tool, available or not, by name.
    """

    def available(self, name: str) -> ToolEntry | None: ...

    def entries(self) -> list[ToolEntry]: ...


def now_ms() -> int:
    return int(time.time() * 1000)


class DeadLetters(Protocol):
    def send_raw(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str, error: str
    ) -> None: ...


class Catalogue:
    """The table, fed from the registry topic. Thread-safe: readers may call from any thread.

    - ``load()``: read the topic to its end once (a one-shot read; the CLI).
    - ``start()`` / ``stop()``: a daemon thread follows the topic and keeps the table current.
    - ``poll(timeout_s)``: fold whatever arrived, from the caller's own loop (a processor per batch).

    The topic is read from the start by an assigned consumer (no group, nothing committed): every
    reader builds the whole table. With ``dead_letters``, undecodable messages are dead-lettered; give
    one only to the one long-running reader that owns that job (it re-sends after its own restart, with
    the same source topic/partition/offset in the headers).
    """

    def __init__(self, settings: Settings, *, dead_letters: DeadLetters | None = None) -> None:
        self.settings = settings
        self.topic = settings.topic(TOOL_REGISTRY)
        self.dead_letters = dead_letters
        self.state = CatalogueState(default_lease_ms=int(settings.registry_lease_s * 1000))
        self.rejected: list[tuple[int, int, str, str]] = []  # partition, offset, reason, detail
        self._lock = threading.Lock()
        self._consumer: Consumer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._partitions: set[int] = set()
        self._seen = 0

    # -- feeding ---------------------------------------------------------------------------------------
    def _open(self) -> Consumer:
        if self._consumer is None:
            self._consumer, self._partitions = table_reader(self.settings, self.topic, "catalogue")
        return self._consumer

    def load(self, timeout_s: float = 30.0) -> Catalogue:
        """Read every message up to each partition's end (not ListOffsets: wrong on the embedded broker)."""
        consumer = self._open()
        left = set(self._partitions)
        deadline = time.monotonic() + timeout_s
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry topic {self.topic} not read to its end within {timeout_s}s")
            left -= self._fold(consumer.consume(500, 0.2))
        return self

    def poll(self, timeout_s: float = 0.0) -> int:
        """Fold what has arrived (waiting at most ``timeout_s``); returns how many messages were read."""
        before = self._seen
        self._fold(self._open().consume(500, timeout_s))
        return self._seen - before

    def _fold(self, batch: list[Any]) -> set[int]:
        at_eof: set[int] = set()
        with self._lock:
            for msg in batch:
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_eof.add(msg.partition())
                    continue
                self._seen += 1
                _, stamp = msg.timestamp()
                applied = self.state.apply(msg.key(), msg.value(), received_ms=stamp if stamp > 0 else None)
                if applied.outcome == "rejected":
                    self._reject(msg, applied)
        return at_eof

    def _reject(self, msg: Any, applied: Applied) -> None:
        self.rejected.append((msg.partition(), msg.offset(), applied.reason, applied.detail))
        if self.dead_letters is not None:
            self.dead_letters.send_raw(
                msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), applied.reason, applied.detail
            )
        else:
            log.warning(
                "undecodable registry message %s[%s]@%s: %s",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                applied.reason,
                extra={"reason": applied.reason, "error": applied.detail[:500]},
            )

    def start(self) -> Catalogue:
        """Load, then follow the topic in a daemon thread until ``stop()``."""
        self.load()
        self._thread = threading.Thread(target=self._follow, name="catalogue", daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll(0.5)
            except Exception:  # the table stays as it was; the next poll tries again
                log.exception("catalogue poll failed")
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
            self._consumer = None

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading ---------------------------------------------------------------------------------------
    def entry(self, name: str) -> ToolEntry | None:
        """The tool's entry, available or not; ``None`` if the name was never announced."""
        with self._lock:
            return self.state.entry(name, now_ms())

    def available(self, name: str) -> ToolEntry | None:
        """The tool's entry if it has a live member, else ``None``."""
        entry = self.entry(name)
        return entry if entry is not None and entry.available else None

    def entries(self) -> list[ToolEntry]:
        with self._lock:
            return self.state.entries(now_ms())
