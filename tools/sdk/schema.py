"""The tools' idempotency ledger: one row per command id, shared by every tool (``ledger``)."""

from __future__ import annotations

from streamagent.db import Schema

SCHEMA = Schema(
    "tool_ledger",
    (
        """
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
        )
        """,
    ),
)
