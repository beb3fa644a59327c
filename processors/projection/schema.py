"""The projection's tables: one row per run, one row per event of its timeline (read by ``queries``)."""

from __future__ import annotations

from streamagent.db import Schema

SCHEMA = Schema(
    "projection",
    (
        """
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
        )
        """,
        "CREATE INDEX IF NOT EXISTS runs_status ON runs (status)",
        """
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
        )
        """,
        "CREATE INDEX IF NOT EXISTS run_events_by_run ON run_events (run_id, occurred_at)",
        # Which workflow a run follows, so `runs` can show its steps out of the workflow's total.
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS workflow text",
        # What the run's decisions cost, summed over its DecisionRecorded events (recomputed from
        # run_events, so a redelivered batch cannot count a decision twice). numeric: the sum of many
        # small prices stays exact instead of drifting as binary floats do.
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS prompt_tokens bigint NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS completion_tokens bigint NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS cost_usd numeric NOT NULL DEFAULT 0",
        # Decisions a model took (decider other than the rules), and those whose tokens were counted
        # locally because the endpoint reported no usage: the totals are then an estimate, and say so.
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS model_decisions int NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS estimated_decisions int NOT NULL DEFAULT 0",
    ),
)
