"""The decision processor's tables: every decision it made (memoized per run and state version, with
the command it produced), and each run's latest decided version."""

from __future__ import annotations

from streamagent.db import Schema

SCHEMA = Schema(
    "decision",
    (
        """
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
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS decision_progress (
            run_id          text PRIMARY KEY,
            latest_version  bigint NOT NULL,
            superseded      int    NOT NULL DEFAULT 0
        )
        """,
        # The tools once looked decisions up by id to refuse commands no decision issued; signed
        # commands replaced that check, and every stored decision paid for this index.
        "DROP INDEX IF EXISTS decisions_by_id",
    ),
)
