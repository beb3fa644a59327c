"""The idempotency ledger: one row per command id, in PostgreSQL.

A command whose row is final (succeeded/failed) is never executed again: its recorded result
event is published instead.

The hot path costs few round trips: ``Ledger.claim`` claims the ledger rows of a whole consumed
batch in one statement (whether a command was issued by the pipeline is its signature's business,
checked before the claim; whether it is stale or unapproved is ``admission``'s, asked just before it
in one more statement per batch: the claim reads no other layer's table), and ``LedgerWriter`` group-commits the attempt
counts and final results that concurrent commands write, one statement per flush. A transient
database error (lost connection, restart, deadlock: ``streamagent.errors.outage``) is retried with
backoff until the statement goes through or the tool stops, on a connection replaced in one place
(``db.AsyncReconnecting``); it never fails, dead-letters or acknowledges a command. The outage is
logged once and shown in ``streamagent_dependency_up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from streamagent import db
from streamagent.config import Settings
from streamagent.errors import outage
from streamagent.metrics import DependencyHealth
from streamagent.retry import RetryPolicy

log = logging.getLogger(__name__)

# Retries of a statement that failed transiently: until it succeeds or the tool stops.
DB_RETRY = RetryPolicy(initial_s=0.05, multiplier=2.0, max_backoff_s=2.0, max_attempts=0)


def _transient(exc: BaseException) -> bool:
    """An outage of PostgreSQL (``errors.outage``: lost and refused connections, restarts, serialization
    failures, deadlocks), or a socket error or timeout: worth another try. Anything else (bad data, a
    bug in a statement) fails the same way every time."""
    return outage(exc) is not None or isinstance(exc, OSError | TimeoutError)


class Stopping(Exception):
    """The tool is shutting down while a database round trip was being retried."""


@dataclass(frozen=True)
class LedgerEntry:
    status: str
    attempts: int
    result_event: bytes | None

    @property
    def final(self) -> bool:
        return self.status in ("succeeded", "failed")


@dataclass(frozen=True)
class ClaimRequest:
    """One consumed (and verified) command. ``claim=False``: another occurrence of the same command id
    is in flight in this process; its row is left alone and that occurrence's result is reused."""

    command_id: str
    run_id: str
    step: str
    claim: bool = True


@dataclass(frozen=True)
class Claimed:
    """A command's claim: its ledger row as it now stands (None when not claimed)."""

    entry: LedgerEntry | None


# One statement per batch: the ledger rows of the commands to claim, claimed as 'running' with
# their first attempt counted (a final row is left as it is).
CLAIM_SQL = """
WITH input AS (
    SELECT * FROM unnest(%(ids)s::text[], %(runs)s::text[], %(steps)s::text[], %(claim)s::bool[])
        WITH ORDINALITY AS i(command_id, run_id, step, claim, n)
), claimed AS (
    INSERT INTO tool_ledger AS t (command_id, tool, run_id, step, status, attempts)
    SELECT DISTINCT ON (command_id) command_id, %(tool)s, run_id, step, 'running', 1
    FROM input WHERE claim ORDER BY command_id, n
    ON CONFLICT (command_id) DO UPDATE SET
        attempts = CASE WHEN t.status IN ('succeeded', 'failed') THEN t.attempts ELSE t.attempts + 1 END,
        updated_at = now()
    RETURNING t.command_id, t.status, t.attempts, t.result_event
)
SELECT x.status, x.attempts, x.result_event
FROM input i LEFT JOIN claimed x ON x.command_id = i.command_id AND i.claim
ORDER BY i.n
"""

# One statement per flush of the group commit: attempts added and final results, per command.
WRITE_SQL = """
UPDATE tool_ledger AS t SET
    attempts = t.attempts + u.added,
    status = COALESCE(u.status, t.status),
    result_event = COALESCE(u.result_event, t.result_event),
    updated_at = now()
FROM unnest(%s::text[], %s::int[], %s::text[], %s::bytea[]) AS u(command_id, added, status, result_event)
WHERE t.command_id = u.command_id
"""


class Ledger:
    """One connection; every statement is one round trip, counted in ``round_trips`` (and per statement
    kind, "claim" or "write", in ``round_trips_by``; a retried statement counts each try)."""

    def __init__(
        self,
        database_url: str,
        conn: psycopg.AsyncConnection[Any] | None = None,
        *,
        stop: asyncio.Event | None = None,
        retry: RetryPolicy = DB_RETRY,
        health: DependencyHealth | None = None,
    ) -> None:
        self.database_url = database_url
        self._db = db.AsyncReconnecting(database_url)
        self._db.current = conn
        self.health = health or DependencyHealth("ledger")
        self.stop = stop or asyncio.Event()
        self.retry = retry
        self.round_trips = 0
        self.round_trips_by: Counter[str] = Counter()
        self._closed = False

    @classmethod
    async def open(
        cls, settings: Settings, *, stop: asyncio.Event | None = None, health: DependencyHealth | None = None
    ) -> Ledger:
        ledger = cls(settings.database_url, stop=stop, health=health)
        try:
            await ledger._connection()
        except Exception as exc:
            if outage(exc) is None:
                raise
            ledger.health.down("postgres", exc)  # connected on first use, once it is back
        return ledger

    @property
    def conn(self) -> psycopg.AsyncConnection[Any] | None:
        """The current connection (None between a broken one and its replacement)."""
        return self._db.current

    async def close(self) -> None:
        self._closed = True
        await self._db.close()

    # -- the statements --------------------------------------------------------------------------
    async def claim(self, tool: str, requests: Sequence[ClaimRequest]) -> list[Claimed | Exception]:
        """Claim the rows of ``requests`` in one round trip; one result each,
        in order. A statement that fails for good (not transiently) is retried one request at a
        time, so that one bad command gets the error and the others their claims."""
        if not requests:
            return []
        params = {
            "ids": [r.command_id for r in requests],
            "runs": [r.run_id for r in requests],
            "steps": [r.step for r in requests],
            "claim": [r.claim for r in requests],
            "tool": tool,
        }
        try:
            rows = await self._round_trip("claim", CLAIM_SQL, params)
        except Stopping:
            raise
        except Exception as exc:
            if len(requests) == 1:
                return [exc]
            log.warning("claiming a batch of %d failed (%r); claiming one at a time", len(requests), exc)
            out: list[Claimed | Exception] = []
            for request in requests:
                out += await self.claim(tool, [request])
            return out
        assert len(rows) == len(requests)
        return [
            Claimed(LedgerEntry(status, attempts, bytes(result) if result is not None else None))
            if status is not None
            else Claimed(None)
            for status, attempts, result in rows
        ]

    async def query(self, kind: str, sql: str, params: Any) -> list[tuple[Any, ...]]:
        """Another statement on the ledger's connection, with the same retries (``kind`` names it in
        ``round_trips_by``): the runner's admission check (``admission.ADMIT_SQL``) is one per batch."""
        return await self._round_trip(kind, sql, params)

    async def write(self, writes: Sequence[Write]) -> None:
        """Apply ``writes`` (one per command id) in one statement."""
        await self._round_trip(
            "write",
            WRITE_SQL,
            (
                [w.command_id for w in writes],
                [w.added for w in writes],
                [w.status for w in writes],
                [w.result_event for w in writes],
            ),
        )

    # -- round trips -----------------------------------------------------------------------------
    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._closed:
            raise Stopping("ledger closed")
        return await self._db.conn()

    async def _round_trip(self, kind: str, sql: str, params: Any) -> list[tuple[Any, ...]]:
        """Run one statement; retry a transient failure with backoff until it goes through or stop is set."""
        attempt = 0
        while True:
            attempt += 1
            self.round_trips += 1
            self.round_trips_by[kind] += 1
            try:
                conn = await self._connection()
                cur = await conn.execute(sql, params)
                rows = await cur.fetchall() if cur.description is not None else []
            except Exception as exc:
                if not _transient(exc):
                    raise
                self.health.down("postgres", exc)
                delay = self.retry.backoff(attempt)
                log.debug("database round trip failed (attempt %d), retrying in %.2fs: %r", attempt, delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
                if self.stop.is_set():
                    raise Stopping from exc
                continue
            if attempt > 1:
                self.health.up("postgres")
            return rows


@dataclass
class Write:
    """What one flush does to one command's row: attempts to add, and its final status and result."""

    command_id: str
    added: int = 0
    status: str | None = None
    result_event: bytes | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class LedgerWriter:
    """Group commit: writes from concurrent commands are collected for up to ``max_delay_s`` (or until
    ``max_batch`` are pending) and applied in one statement; each writer's await returns once its
    write is durable. Writes that arrive during a flush go into the next one."""

    def __init__(self, ledger: Ledger, *, max_delay_s: float = 0.002, max_batch: int = 500) -> None:
        self.ledger = ledger
        self.max_delay_s = max_delay_s
        self.max_batch = max_batch
        self.flushes = 0
        self._pending: dict[str, Write] = {}
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def attempt(self, command_id: str) -> None:
        """Count one more attempt of ``command_id``; returns once durable."""
        await self._submit(command_id, added=1)

    async def finish(self, command_id: str, status: str, result_event: bytes) -> None:
        """Record ``command_id``'s final status and result event; returns once durable."""
        await self._submit(command_id, status=status, result_event=result_event)

    async def _submit(
        self, command_id: str, *, added: int = 0, status: str | None = None, result_event: bytes | None = None
    ) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flusher(), name="ledger-group-commit")
        write = self._pending.get(command_id)
        if write is None:
            write = self._pending[command_id] = Write(command_id)
        write.added += added
        if status is not None:
            write.status, write.result_event = status, result_event
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        write.waiters.append(done)
        self._wake.set()
        if len(self._pending) >= self.max_batch:
            self._full.set()
        await done

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._pending) < self.max_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), timeout=self.max_delay_s)
            self._wake.clear()
            self._full.clear()
            batch = list(self._pending.values())[: self.max_batch]
            for write in batch:
                del self._pending[write.command_id]
            if len(self._pending) >= 1:
                self._wake.set()
            try:
                await self._flush(batch)
            except Exception:  # never let the flusher die: each waiter has been told already
                log.exception("ledger group commit failed")

    async def _flush(self, batch: list[Write]) -> None:
        self.flushes += 1
        try:
            await self.ledger.write(batch)
        except Stopping as exc:
            _settle(batch, exc)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch, exc)
                return
            log.warning("group commit of %d writes failed (%r); writing one at a time", len(batch), exc)
            for write in batch:
                await self._flush([write])
        else:
            _settle(batch, None)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        _settle(list(self._pending.values()), Stopping("ledger writer closed"))
        self._pending.clear()


def _settle(batch: list[Write], error: BaseException | None) -> None:
    for write in batch:
        for waiter in write.waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
