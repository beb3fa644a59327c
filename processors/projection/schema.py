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
        # Approval requests of the guard and their answers (`streamagent approvals`, approve, deny).
        """
        CREATE TABLE IF NOT EXISTS approvals (
            request_id      text PRIMARY KEY,
            run_id          text NOT NULL,
            step            text NOT NULL,
            tool            text NOT NULL,
            arguments       jsonb NOT NULL,
            reason          text NOT NULL,
            policy_version  text NOT NULL,
            status          text NOT NULL,
            requested_at    timestamptz NOT NULL,
            expires_at      timestamptz NOT NULL,
            decided_by      text,
            note            text,
            decided_at      timestamptz
        )
        """,
        "CREATE INDEX IF NOT EXISTS approvals_pending ON approvals (status, requested_at)",
        "CREATE INDEX IF NOT EXISTS approvals_by_run ON approvals (run_id, step)",
        # Quality signals (``streamagent report``), computed from the run's projected events when it ends
        # and again when a late event of an ended run arrives (a result on its own topic). Until then
        # they stay at their defaults: a running run is counted as running, never scored.
        # workflow_steps: the steps of the run's workflow (its minimum), from the workflow file when the
        # request is projected; NULL for a workflow unknown to the projection.
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS workflow_steps int",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS decisions int NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS tool_calls int NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS tool_attempts int NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS retries int NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS guard_refusals int NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS approvals int NOT NULL DEFAULT 0",
        # Seconds each decided approval waited (request to grant, denial or expiry), in request order.
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS approval_waits_s float8[] NOT NULL DEFAULT '{}'",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS duration_s float8",
        # Whether this database has already counted the run's end in the Prometheus metrics: a batch
        # delivered again does not count it twice (a replay into an empty database does, once).
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS quality_counted boolean NOT NULL DEFAULT false",
        "CREATE INDEX IF NOT EXISTS runs_created_at ON runs (created_at)",
        # Quality signals of shared memory: commands refused as stale-memory, changes after an effect.
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS stale_memory int NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS memory_after_effect int NOT NULL DEFAULT 0",
        # Child workflows: the run and step a child run was started by (`show` lists a parent's children).
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS parent_run_id text",
        "ALTER TABLE runs ADD COLUMN IF NOT EXISTS parent_step text",
        "CREATE INDEX IF NOT EXISTS runs_parent ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL",
        # Shared memory: every version of every entity, as the memory processor published it
        # (`streamagent memory get` reads the last, `memory history` all of them).
        """
        CREATE TABLE IF NOT EXISTS memory_versions (
            entity          text NOT NULL,
            key             text NOT NULL,
            version         int  NOT NULL,
            fields          jsonb NOT NULL,
            deleted         boolean NOT NULL DEFAULT false,
            as_of           timestamptz NOT NULL,
            writer          text NOT NULL,
            write_id        text NOT NULL,
            kafka_partition int NOT NULL,
            kafka_offset    bigint NOT NULL,
            PRIMARY KEY (entity, key, version)
        )
        """,
    ),
)
