"""PostgreSQL: connections and the schema every process may need, applied idempotently."""

from __future__ import annotations

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

CREATE INDEX IF NOT EXISTS decisions_by_id ON decisions (decision_id);

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


def connect(settings: Settings, *, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(settings.database_url, autocommit=autocommit)


def migrate(settings: Settings) -> None:
    with connect(settings, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(SCHEMA)
        conn.commit()
