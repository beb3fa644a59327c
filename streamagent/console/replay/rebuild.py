"""Rebuild, off to the side, what the state processor and the projection derive from the log.

The very code the live processes run does the work: the state processor's ``StateWorker`` (fold,
admission, which snapshots to publish, which events to dead-letter) over an in-memory store, and the
projection's ``ProjectionHandler`` writing into a schema of its own (``replay_<id>``, created with the
projection's DDL through ``search_path``), as ``BulkProjection`` (``bulk.py``: the same rows, written in
bulk, in a process of its own beside the fold). Both are given a stand-in producer that keeps what they
would have produced and sends nothing, so a replay never writes to a topic: no snapshot reaches the
decision layer, no command reaches a tool, no dead letter is sent. The worker's timer (deadlines,
re-drives) is never started: what it once decided is in the log as events, and is folded as such.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Message
from psycopg import conninfo, sql

from streamagent import codec, db, dlq
from streamagent.config import Settings
from streamagent.events import RunRequested, StateSnapshot, ToolResult, is_child_tool
from streamagent.processors.projection.schema import SCHEMA
from streamagent.processors.state.app import StateWorker
from streamagent.processors.state.fold import RunState
from streamagent.processors.workflow import load_workflows
from streamagent.runtime import Batch, Incoming
from streamagent.signing import load_keys
from streamagent.topics import DEAD_LETTERS, TOOL_RESULTS

from .bulk import BulkProjection
from .source import SEEK_SLACK_MS, Read, batches, fold_order, read

SCHEMA_PREFIX = "replay_"
# Events per projection transaction: the projection into a schema of its own has no consumer to keep
# moving, so it takes far larger batches than live (``batch_size``), and pays each statement fewer times.
PROJECT_BATCH = 5000


@dataclass(frozen=True)
class Scope:
    """Which runs, and up to when. Empty: every run, to the end of the log."""

    runs: frozenset[str] | None = None
    since: datetime | None = None  # runs requested at or after this moment
    until: datetime | None = None  # records stamped after this moment are left out

    @property
    def full(self) -> bool:
        return self.runs is None and self.since is None and self.until is None


@dataclass(frozen=True)
class Letter:
    """A message the live process would have dead-lettered."""

    processor: str
    source: str  # topic[partition]@offset
    reason: str
    detail: str


@dataclass
class Rebuilt:
    scope: Scope
    schema: str  # where the rebuilt projection is
    states: dict[str, RunState] = field(default_factory=dict)
    snapshots: dict[str, dict[int, StateSnapshot]] = field(default_factory=dict)  # run -> version -> snapshot
    letters: list[Letter] = field(default_factory=list)
    run_ids: set[str] = field(default_factory=set)  # the runs in scope
    partitions: dict[str, int] = field(default_factory=dict)  # each run's partition (of every run topic)
    read: Read = field(default_factory=Read)
    events: int = 0  # records replayed (in scope)
    skipped: int = 0  # records read but out of scope
    decode_s: float = 0.0
    fold_s: float = 0.0  # the fold, from the end of decoding
    project_s: float = 0.0  # the projection, in a process beside the fold
    wall_s: float = 0.0  # decode + fold and projection side by side

    @property
    def seconds(self) -> float:
        """Read, decode, fold and project: the rebuild from the first fetch to the last row."""
        return self.read.seconds + (self.wall_s or self.decode_s + self.fold_s + self.project_s)


class Captured:
    """Stands in for the producer: keeps what would have been produced; nothing leaves the process."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, Any]] = []

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None, **kwargs: Any) -> None:
        self.records.append((topic, key, value, kwargs.get("headers")))

    def flush(self, timeout: float | None = None) -> int:
        return 0

    def poll(self, timeout: float | None = None) -> int:
        return 0


class _Sink:
    """The projection's dead-letter sink, writing nothing: it notes the letter."""

    def __init__(self, letters: list[Letter]) -> None:
        self.letters = letters

    def send(self, msg: Message, reason: str, error: str) -> None:
        self.letters.append(Letter("projection", _where(msg), reason, error))


@dataclass(frozen=True)
class _FaustMessage:
    """The message shape the state worker reads (faust's: attributes, not methods)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any = None


def _where(msg: Message) -> str:
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


def schema_settings(settings: Settings, schema: str) -> Settings:
    """``settings`` whose database connections use ``schema`` (and only it) for unqualified names."""
    url = conninfo.make_conninfo(settings.database_url, options=f"-c search_path={schema}")
    return settings.model_copy(update={"database_url": url})


def new_schema_name() -> str:
    return f"{SCHEMA_PREFIX}{time.strftime('%Y%m%d%H%M%S')}_{uuid.uuid4().hex[:6]}"


Progress = Callable[[str, int, int | None], None]  # (phase, done, total or None)


def rebuild(
    settings: Settings,
    scope: Scope = Scope(),
    progress: Progress | None = None,
    schema: str | None = None,
    *,
    project: bool = True,
) -> Rebuilt:
    """Read the log, fold it and project it into a new schema (unless not ``project``); the live state and
    tables are not touched."""
    name = schema or new_schema_name()
    out = Rebuilt(scope, name)
    out.read = read(settings, scope.since, (lambda n, total: progress("read", n, total)) if progress else None)
    wanted = _in_scope(out.read.fold, settings, scope)
    fold = [m for m in fold_order(out.read.fold) if _keep(m, wanted, scope)]
    projected = [m for m in fold_order(out.read.fold + out.read.commands) if _keep(m, wanted, scope)]
    out.events = len(projected)
    out.skipped = out.read.count - len(projected)
    out.run_ids = set(wanted) if wanted is not None else {m.key().decode() for m in projected if m.key()}

    started = time.monotonic()
    decoded = decode_all(settings, projected)
    out.decode_s = time.monotonic() - started
    if not project:
        _fold(settings, fold, decoded, out, progress)
        out.fold_s = time.monotonic() - started - out.decode_s
        return out
    # The projection is Python work (rows, COPY) and PostgreSQL's: it runs in a process of its own beside
    # the fold, forked once the events are decoded so that it shares them without sending them over.
    projecting = _Apart(_project, settings, projected, decoded, out.scope, out.schema)
    try:
        _fold(settings, fold, decoded, out, progress)
        out.fold_s = time.monotonic() - started - out.decode_s
        letters, out.project_s = projecting.result()
    finally:
        projecting.stop()
    out.letters[:0] = letters
    out.wall_s = time.monotonic() - started
    return out


class _Apart:
    """``fn(settings, messages, decoded, Rebuilt(scope, schema), None)`` in a forked process; its result
    is the letters it noted and its seconds. (Fork, not spawn: the child reads the parent's decoded
    events where they are; it opens its own database connection and never touches the broker.)"""

    def __init__(
        self,
        fn: Callable[..., None],
        settings: Settings,
        messages: list[Message],
        decoded: Decoded,
        scope: Scope,
        schema: str,
    ) -> None:
        ctx = multiprocessing.get_context("fork")
        self.results, sender = ctx.Pipe(duplex=False)

        def child() -> None:
            try:
                mine = Rebuilt(scope, schema)
                seconds = _timed(fn, settings, messages, decoded, mine, None)
                sender.send((None, mine.letters, seconds))
            except BaseException as exc:  # told to the parent, which raises
                sender.send((f"{type(exc).__name__}: {exc}", [], 0.0))

        self.process = ctx.Process(target=child, name="replay-projection", daemon=True)
        self.process.start()
        sender.close()

    def result(self) -> tuple[list[Letter], float]:
        try:
            error, letters, seconds = self.results.recv()
        except EOFError:
            raise RuntimeError(f"the replay's projection process ended with code {self.process.exitcode}") from None
        if error is not None:
            raise RuntimeError(f"the replay's projection failed: {error}")
        return letters, seconds

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.results.close()


def _in_scope(messages: list[Message], settings: Settings, scope: Scope) -> set[str] | None:
    """The run ids in scope, or None for "every run"."""
    if scope.since is None:
        return set(scope.runs) if scope.runs is not None else None
    # A run belongs to ``--from`` when its request (its first event) is stamped at or after it.
    events = settings.topic("agent.run.events")
    first: dict[bytes, Message] = {}
    for m in messages:
        if m.topic() == events and m.key() is not None and m.key() not in first:
            first[m.key()] = m
    # The record's timestamp only narrows what is decoded (with the producer's clock skew allowed for);
    # the request's own time decides.
    since_ms = scope.since.timestamp() * 1000 - SEEK_SLACK_MS
    since = scope.since.replace(microsecond=scope.since.microsecond // 1000 * 1000)  # the log keeps ms
    chosen: set[str] = set()
    for key, m in first.items():
        if m.timestamp()[1] < since_ms:
            continue
        try:
            event = codec.decode(m.value(), settings.max_event_bytes)
        except codec.DecodeError:
            continue
        if isinstance(event, RunRequested) and event.occurred_at >= since:
            chosen.add(key.decode())
    return chosen if scope.runs is None else chosen & set(scope.runs)


def _keep(m: Message, wanted: set[str] | None, scope: Scope) -> bool:
    if scope.until is not None and m.timestamp()[1] > scope.until.timestamp() * 1000:
        return False
    if wanted is None:
        return True
    key = m.key()
    return key is not None and key.decode(errors="replace") in wanted


class _ObjectStore:
    """The run store, holding objects: a replay serializes each run once, at the end, not per batch."""

    def __init__(self) -> None:
        self.data: dict[str, RunState] = {}

    def get(self, run_id: str) -> RunState | None:
        return self.data.get(run_id)

    def put(self, state: RunState, partition: int) -> None:
        self.data[state.snapshot.run_id] = state

    def raw_items(self) -> Iterator[tuple[str, bytes]]:
        return iter([(k, v.model_dump_json().encode()) for k, v in self.data.items()])


class ReplayWorker(StateWorker):
    """The state processor's worker, fed records decoded once for both the fold and the projection, and
    keeping the snapshots it publishes as objects (what the live worker encodes and produces)."""

    def __init__(self, settings: Settings, store: _ObjectStore, producer: Captured, decoded: Decoded) -> None:
        # With the pipeline keys: replay folds only what verifies, as the live fold does.
        super().__init__(settings, store, producer, load_workflows(settings.workflows_dir), keys=load_keys(settings))  # type: ignore[arg-type]
        self.decoded = decoded
        self.published: list[StateSnapshot] = []

    def decode(self, message: Any, trusted: bool = False) -> Any:
        got = self.decoded.get((message.topic, message.partition, message.offset))
        if isinstance(got, codec.DecodeError):
            raise got
        return got if got is not None else super().decode(message, trusted)

    def _publish(self, state: RunState) -> None:
        self.published.append(state.snapshot)


Decoded = dict[tuple[str, int, int], Any]  # (topic, partition, offset) -> the event, or its DecodeError


def decode_all(settings: Settings, messages: list[Message]) -> Decoded:
    out: Decoded = {}
    for m in messages:
        try:
            out[(m.topic(), m.partition(), m.offset())] = codec.decode(m.value(), settings.max_event_bytes)
        except codec.DecodeError as exc:
            out[(m.topic(), m.partition(), m.offset())] = exc
    return out


def _fold(
    settings: Settings, messages: list[Message], decoded: Decoded, out: Rebuilt, progress: Progress | None
) -> None:
    store = _ObjectStore()
    captured = Captured()
    worker = ReplayWorker(settings, store, captured, decoded)
    done = 0
    if progress is not None:
        progress("fold", 0, len(messages))  # the phase's clock starts here
    for chunk in run_disjoint(messages, settings.batch_size):
        worker.fold_batch(
            [_FaustMessage(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers()) for m in chunk]
        )
        done += len(chunk)
        if progress is not None and (done == len(messages) or done % 5000 < len(chunk)):
            progress("fold", done, len(messages))
    out.states = dict(store.data)
    out.partitions = {m.key().decode(): m.partition() for m in messages if m.key() is not None}
    for snap in worker.published:
        out.snapshots.setdefault(snap.run_id, {})[snap.version] = snap
    letters_topic = settings.topic(DEAD_LETTERS)
    results_topic = settings.topic(TOOL_RESULTS)
    for topic, _key, _value, headers in captured.records:
        if topic == letters_topic:
            h = {k: (v or b"").decode(errors="replace") for k, v in headers or []}
            source = f"{h.get(dlq.H_TOPIC, '?')}[{h.get(dlq.H_PARTITION, '?')}]@{h.get(dlq.H_OFFSET, '?')}"
            out.letters.append(Letter("state", source, h.get(dlq.H_REASON, "?"), h.get(dlq.H_ERROR, "")))
        elif topic == results_topic and _is_child_answer(_value):
            # A child run's end answers its parent's step (processors/state/children.py): live, that answer
            # was produced then and is in the log, folded into the parent from there; it is not re-sent.
            continue
        else:  # the worker's timer would emit events; the fold alone never does
            raise AssertionError(f"the fold produced to {topic}")


def _is_child_answer(value: bytes | None) -> bool:
    event = codec.decode(value) if value else None
    return isinstance(event, ToolResult) and is_child_tool(event.tool)


def _timed(fn: Callable[..., None], *args: Any) -> float:
    started = time.monotonic()
    fn(*args)
    return time.monotonic() - started


def run_disjoint(messages: list[Message], size: int) -> Iterator[list[Message]]:
    """Batches in which no run appears twice (at most ``size`` records each).

    The worker publishes at most one snapshot per run per batch (the latest): live, a run's events come
    one hop apart and so in separate batches, and each snapshot the decider saw was published. A replay
    that put a run's whole history into one batch would publish only its last.
    """
    chunk: list[Message] = []
    seen: set[bytes | None] = set()
    for m in messages:
        key = m.key()
        if key in seen or len(chunk) >= size:
            yield chunk
            chunk, seen = [], set()
        chunk.append(m)
        seen.add(key)
    if chunk:
        yield chunk


def _project(
    settings: Settings, messages: list[Message], decoded: Decoded, out: Rebuilt, progress: Progress | None
) -> None:
    create_schema(settings, out.schema)
    target = schema_settings(settings, out.schema)
    db.migrate(target, SCHEMA)
    handler = BulkProjection(target)
    handler.start()
    sink = _Sink(out.letters)
    done = 0
    try:
        for chunk in batches(messages, PROJECT_BATCH):
            items: list[Incoming] = []
            for m in chunk:
                event = decoded[(m.topic(), m.partition(), m.offset())]
                if isinstance(event, codec.DecodeError):
                    out.letters.append(Letter("projection", _where(m), event.reason, event.detail))
                else:
                    items.append(Incoming(m, event))
            if items:
                handler(Batch(items, sink))  # type: ignore[arg-type]
            done += len(chunk)
            if progress is not None:
                progress("project", done, len(messages))
        handler.finish()
    finally:
        handler.db.close()


def create_schema(settings: Settings, schema: str) -> None:
    with db.connect(settings) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))


def drop_schema(settings: Settings, schema: str) -> None:
    with db.connect(settings) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
