"""Memory: the current version of every shared entity, folded from the memory topic into a local table.

The memory topic (``agent.memory``, compacted) holds one ``EntityVersion`` per change of an entity, keyed
``<entity>/<key>``; the memory processor is its only writer. Every process that decides on memory (the
decision processor, whose memory watch tells runs of changes) or must not act on stale memory (a tool) keeps a
``MemoryTable``: an assigned consumer (no group, nothing committed) reads every partition from the start
and keeps the last version of each key, so a read is a dict lookup, never a network call. The table
is as current as the last fetch; ``fresh_since(t)`` waits until it holds everything the broker had
acknowledged by time ``t`` (the staleness check before a tool's effect uses it).

On a broker that compacts, the table's size is bounded by the entities that exist, not by how often
they changed; a deleted entity's tombstone (a null value) removes it. The embedded broker never compacts,
so the table is rebuilt from the whole history there (``BROKER-NOTES.md``), with the same result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError

from streamagent import codec
from streamagent.authn import Authenticator, Unauthenticated
from streamagent.config import Settings
from streamagent.errors import DecodeError
from streamagent.events import EntityVersion, entity_ref, now
from streamagent.kafka import table_reader
from streamagent.topics import MEMORY

log = logging.getLogger(__name__)

# How long the follower blocks in one poll: the bound on how late ``fresh_since`` learns that a poll
# started after the time it waits for.
_POLL_S = 0.05


class MemoryTable:
    """The last version of every entity on the memory topic. Thread-safe.

    - ``load()``: read every partition to its end once (a CLI, a test, a process starting).
    - ``start()`` / ``stop()``: then follow the topic in a daemon thread.
    """

    def __init__(
        self, settings: Settings, name: str = "memory-table", authenticator: Authenticator | None = None
    ) -> None:
        self.settings = settings
        # With the pipeline keys (the decision and memory processors hold them), a version not signed by
        # the memory processor is skipped; a tool holds only its own key and reads what the topic holds.
        self.authenticator = authenticator
        self.name = name
        self.topic = settings.topic(MEMORY)
        self.rejected = 0
        self._entities: dict[str, EntityVersion] = {}
        # References changed since the last ``take_changes`` and when (the memory watch reads them).
        self._changes: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self._consumer: Consumer | None = None
        self._partitions: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Monotonic start time of the last poll that returned: every record acknowledged before a poll
        # started (plus one fetch wait) is in the table once that poll returns.
        self._polled_from = 0.0
        self._polled = threading.Condition(self._lock)
        # Coroutines waiting in ``caught_up``: (the poll start they need, their loop, their future).
        self._waiters: list[tuple[float, asyncio.AbstractEventLoop, asyncio.Future[bool]]] = []

    # -- feeding ---------------------------------------------------------------------------------------
    def _open(self) -> Consumer:
        if self._consumer is None:
            self._consumer, self._partitions = table_reader(self.settings, self.topic, self.name)
        return self._consumer

    def load(self, timeout_s: float = 30.0) -> MemoryTable:
        """Read every partition to its end (partition EOF, not ListOffsets: wrong on the embedded broker)."""
        consumer = self._open()
        left = set(self._partitions)
        deadline = time.monotonic() + timeout_s
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"memory topic {self.topic} not read to its end within {timeout_s}s")
            left -= self._fold(consumer.consume(500, 0.2))
        return self

    def poll(self, timeout_s: float = _POLL_S) -> None:
        started = time.monotonic()
        self._fold(self._open().consume(500, timeout_s))
        with self._polled:
            self._polled_from = started
            self._polled.notify_all()
            ready = [w for w in self._waiters if w[0] <= started]
            self._waiters = [w for w in self._waiters if w[0] > started]
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_settle, future, True)

    def _fold(self, batch: list[Any]) -> set[int]:
        at_end: set[int] = set()
        with self._lock:
            for msg in batch:
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition())
                    continue
                self._apply(msg.key(), msg.value(), msg.headers())
        return at_end

    def _apply(self, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        if value is None:  # a tombstone: the entity is gone
            if key is not None:
                ref = key.decode(errors="replace")
                self._entities.pop(ref, None)
                self._changes[ref] = now()
            return
        try:
            version = codec.decode(value)
        except DecodeError as exc:
            # Only the memory processor writes this topic; the projection dead-letters what it cannot read.
            self.rejected += 1
            log.warning("undecodable memory record skipped", extra={"reason": exc.reason})
            return
        if not isinstance(version, EntityVersion):
            self.rejected += 1
            return
        if self.authenticator is not None:
            try:
                self.authenticator.verify(version, value, headers)
            except Unauthenticated as exc:
                self.rejected += 1
                log.warning("unauthenticated memory record skipped: %s", exc, extra={"entity": version.ref})
                return
        # A deletion is kept as the key's last version (readers see no entity), so versions never go back.
        self._entities[version.ref] = version
        self._changes[version.ref] = version.as_of

    def start(self) -> MemoryTable:
        self.load()
        self._thread = threading.Thread(target=self._follow, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # the table stays as it was; the next poll tries again
                log.exception("memory table poll failed")
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            waiting, self._waiters = self._waiters, []
        for _, loop, future in waiting:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, False)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
            self._consumer = None

    def __enter__(self) -> MemoryTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading ---------------------------------------------------------------------------------------
    def get(self, entity: str, key: str) -> EntityVersion | None:
        """The entity as it is now; None if memory has none (never written, or deleted)."""
        found = self.last(entity_ref(entity, key))
        return None if found is None or found.deleted else found

    def last(self, ref: str) -> EntityVersion | None:
        """The key's last version, a deletion included (the memory processor versions on from it)."""
        with self._lock:
            return self._entities.get(ref)

    def current(self, ref: str) -> EntityVersion | None:
        """The entity at ``ref`` as it is now (a ``MemoryReader``); None if memory has none."""
        found = self.last(ref)
        return None if found is None or found.deleted else found

    def version(self, ref: str) -> int:
        """The entity's current version; 0 when memory has none (never written, or deleted)."""
        found = self.last(ref)
        return 0 if found is None or found.deleted else found.version

    def take_changes(self) -> dict[str, datetime]:
        """Every reference that changed since the last call, with when (the changes are then forgotten)."""
        with self._lock:
            changes, self._changes = self._changes, {}
        return changes

    def entities(self) -> dict[str, EntityVersion]:
        """Every entity that exists now, by reference."""
        with self._lock:
            return {ref: v for ref, v in self._entities.items() if not v.deleted}

    def fresh_since(self, moment: float, timeout_s: float = 2.0) -> bool:
        """Wait until the table holds every version the broker acknowledged before ``moment`` (monotonic).

        A record acknowledged at ``moment`` is in the answer to any fetch the client sends after it, and the
        client's fetcher always has one outstanding, answered within the fetch wait; so a poll that *starts*
        one fetch wait (plus a margin for the round trip) after ``moment`` returns it. False if the follower
        did not get there within ``timeout_s`` (it is not running, or the broker is unreachable)."""
        wanted = self._wanted(moment)
        deadline = time.monotonic() + timeout_s
        with self._polled:
            while self._polled_from < wanted:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._polled.wait(left)
        return True

    async def caught_up(self, moment: float, timeout_s: float = 2.0) -> bool:
        """``fresh_since`` for a coroutine: the wait holds no thread. A tool checks memory before each effect;
        with a thread per waiting command, a burst of them filled the executor that its ledger and Kafka
        calls share, and each stood in line for one fetch wait (~70 ms)."""
        wanted = self._wanted(moment)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        with self._lock:
            if self._polled_from >= wanted:
                return True
            if self._thread is None:
                return False
            entry = (wanted, loop, future)
            self._waiters.append(entry)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            return False

    def _wanted(self, moment: float) -> float:
        # A poll that starts one fetch wait (plus a round trip's margin) after ``moment`` returns everything
        # acknowledged by then.
        return moment + self.settings.fetch_wait_ms / 1000 + 0.02


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():  # a waiter that timed out was cancelled
        future.set_result(value)


def stale(table: MemoryTable, seen: dict[str, int]) -> list[str]:
    """Each entity of ``seen`` whose version changed since, as ``contact/acme.io v3 → v4`` (empty: current)."""
    changed = []
    for ref, version in sorted(seen.items()):
        now_version = table.version(ref)
        if now_version != version:
            after = f"v{now_version}" if now_version else "deleted"
            before = f"v{version}" if version else "none"
            changed.append(f"{ref} {before} → {after}")
    return changed


# How a decider reads memory: an entity's reference (``contact/acme.io``) -> its current version, or None.
MemoryReader = Callable[[str], EntityVersion | None]


def no_memory(_ref: str) -> EntityVersion | None:
    return None
