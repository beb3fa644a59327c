"""PostgreSQL: connections and the schema every process may need, applied idempotently.

Long-lived users (the decision and projection processors, the tool ledger) hold their connection in a
``Reconnecting`` (or ``AsyncReconnecting``) holder: a connection that broke (PostgreSQL restarted,
killed, or the network dropped) is replaced before the next use, in this one place. The statement or
transaction that met the broken connection fails; its caller retries it as a whole (every write is
idempotent: stable ids, ON CONFLICT), and ``streamagent.errors.outage`` classes the failure as an
outage of ``postgres``, so it is retried for as long as the outage lasts and never dead-letters.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import psycopg

from streamagent.config import Settings

# Advisory lock so that processes starting together do not race on CREATE TABLE.
_MIGRATION_LOCK = 7_311_042

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id          text PRIMARY KEY,
    company_name    text,
    company_domain  text,
    contact_email   text,
    requested_by    text,
    status          text NOT NULL,
    failed_step     text,
    reason          text,
    steps_done      int  NOT NULL DEFAULT 0,
    created_at      timestamptz,
    updated_at      timestamptz,
    ended_at        timestamptz
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);

CREATE TABLE IF NOT EXISTS run_events (
    event_id      text PRIMARY KEY,
    run_id        text NOT NULL,
    type          text NOT NULL,
    occurred_at   timestamptz NOT NULL,
    causation_id  text,
    step          text,
    summary       text NOT NULL,
    payload       jsonb NOT NULL,
    topic         text NOT NULL,
    kafka_partition int NOT NULL,
    kafka_offset  bigint NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS run_events_by_run ON run_events (run_id, occurred_at);

CREATE TABLE IF NOT EXISTS decisions (
    run_id            text   NOT NULL,
    based_on_version  bigint NOT NULL,
    decision_id       text   NOT NULL,
    action            text   NOT NULL,
    step              text,
    decision_event    bytea  NOT NULL,
    follow_up_topic   text,
    follow_up_event   bytea,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, based_on_version)
);

-- Was there for the tools' "is this decision recorded?" check, which command signatures replaced:
-- nothing looks a decision up by id any more, and every decision stored paid for the index.
DROP INDEX IF EXISTS decisions_by_id;

CREATE TABLE IF NOT EXISTS decision_progress (
    run_id          text PRIMARY KEY,
    latest_version  bigint NOT NULL,
    superseded      int    NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS tool_ledger (
    command_id   text PRIMARY KEY,
    tool         text NOT NULL,
    run_id       text NOT NULL,
    step         text NOT NULL,
    status       text NOT NULL,
    attempts     int  NOT NULL DEFAULT 0,
    result_event bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
"""


log = logging.getLogger(__name__)

# How long a long-running process waits at start for PostgreSQL: for as long as it takes.
WAIT_FOREVER = float("inf")

# Connecting to a PostgreSQL that is down fails at once (refused) or after this many seconds (a
# black-holed host); either way the caller backs off and tries again.
CONNECT_TIMEOUT_S = 5


def connect(settings: Settings, *, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(settings.database_url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S)


class Reconnecting:
    """A connection that is (re)opened on use: ``conn`` returns a live connection, replacing a closed or
    broken one first. Connecting is lazy, so a holder can be built while PostgreSQL is down."""

    def __init__(self, database_url: str, *, autocommit: bool = True) -> None:
        self.database_url = database_url
        self.autocommit = autocommit
        self.connects = 0  # connections opened, for tests
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        current = self._conn
        if current is not None and (current.closed or current.broken):
            log.info("replacing a broken PostgreSQL connection")
            self.discard()
            current = None
        if current is None:
            current = psycopg.connect(self.database_url, autocommit=self.autocommit, connect_timeout=CONNECT_TIMEOUT_S)
            self._conn = current
            self.connects += 1
        return current

    def discard(self) -> None:
        """Drop the connection (it is suspect); the next ``conn`` opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    close = discard


class AsyncReconnecting:
    """``Reconnecting`` for asyncio code (the tool ledger)."""

    def __init__(self, database_url: str, *, autocommit: bool = True) -> None:
        self.database_url = database_url
        self.autocommit = autocommit
        self.connects = 0
        self.current: psycopg.AsyncConnection[Any] | None = None

    async def conn(self) -> psycopg.AsyncConnection[Any]:
        current = self.current
        if current is not None and (current.closed or current.broken):
            log.info("replacing a broken PostgreSQL connection")
            await self.discard()
            current = None
        if current is None:
            current = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=self.autocommit, connect_timeout=CONNECT_TIMEOUT_S
            )
            self.current = current
            self.connects += 1
        return current

    async def discard(self) -> None:
        conn, self.current = self.current, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    close = discard


def migrate(settings: Settings, *, wait_s: float = 0.0, stop: threading.Event | None = None) -> None:
    """Apply the schema. With ``wait_s`` > 0 an unreachable PostgreSQL is waited for that long (a
    process started during an outage waits instead of crash-looping; ``math.inf``: until it is back
    or ``stop`` is set)."""
    from streamagent.errors import outage
    from streamagent.retry import RetryPolicy

    policy = RetryPolicy(initial_s=0.1, max_backoff_s=2.0)
    waiting = stop or threading.Event()
    give_up = time.monotonic() + wait_s
    attempt = 0
    while True:
        attempt += 1
        try:
            with connect(settings, autocommit=False) as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute(SCHEMA)
                conn.commit()
            return
        except Exception as exc:
            if outage(exc) is None or time.monotonic() >= give_up or waiting.is_set():
                raise
            if attempt == 1:
                log.warning("PostgreSQL unavailable at start, waiting for it: %r", exc)
            waiting.wait(policy.backoff(attempt))
