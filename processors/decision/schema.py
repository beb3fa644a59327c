"""The decision processor's tables: every decision it made (memoized per run and state version, with
the command it produced), each run's latest decided version, and the runs whose latest decision is a
wait (``decision_waits``: what the processor wakes when the tool shows up, read in pages), and each
model-decided run's plan (``run_plans``)."""

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
        # One row per run whose latest decision is a wait: written in the same statement as that wait
        # and deleted by the same statement as the run's next decision, so a row is the proof that the
        # run still waits at ``based_on_version``. ``snapshot`` is the snapshot the wait was decided on
        # (codec bytes); ``partition`` its partition on the state topic, so that an instance reads only
        # the waits of the partitions it owns.
        """
        CREATE TABLE IF NOT EXISTS decision_waits (
            run_id            text   PRIMARY KEY,
            tool              text   NOT NULL,
            partition         int    NOT NULL,
            based_on_version  bigint NOT NULL,
            snapshot          bytea  NOT NULL,
            since             timestamptz NOT NULL DEFAULT now()
        )
        """,
        # Waking reads one tool's waits oldest first, a page at a time.
        "CREATE INDEX IF NOT EXISTS decision_waits_by_tool ON decision_waits (tool, since, run_id)",
        # What each decision spent on the model, as numbers: a run's spending is summed here before
        # each model call (its cap). Rows stored before these columns existed hold NULL; their figures
        # are read from the stored event instead (processors/decision/llm/ledger.py).
        "ALTER TABLE decisions ADD COLUMN IF NOT EXISTS prompt_tokens bigint,"
        " ADD COLUMN IF NOT EXISTS completion_tokens bigint, ADD COLUMN IF NOT EXISTS cost_usd double precision",
        # A fan-out's further commands ([[topic, hex bytes], ...]), stored with its decision like the first
        # one: a redelivered snapshot re-emits them all, a re-drive re-sends the one found lost.
        "ALTER TABLE decisions ADD COLUMN IF NOT EXISTS parallel_follow_ups jsonb",
        # One plan per run, made once (by the planner, at the run's first model decision) and reused
        # by every later decision, after any restart. ``plan`` NULL with ``error``: the planner failed,
        # and the run goes on without a plan rather than paying again. ``based_on_version``: the state
        # version it was made on; its tokens and cost are carried by the run's first decision recorded
        # from that version on. ``audit``: the messages sent and the raw answer.
        """
        CREATE TABLE IF NOT EXISTS run_plans (
            run_id             text   PRIMARY KEY,
            based_on_version   bigint NOT NULL,
            plan               text,
            error              text,
            model              text   NOT NULL,
            prompt_tokens      bigint NOT NULL,
            completion_tokens  bigint NOT NULL,
            cost_usd           double precision NOT NULL,
            audit              jsonb  NOT NULL,
            created_at         timestamptz NOT NULL DEFAULT now()
        )
        """,
        # The shared memory each decision read, per (run, step, entity): the memory watch tells a run
        # when an entity its decision read has changed since (processors/decision/memory_watch.py).
        """
        CREATE TABLE IF NOT EXISTS decision_reads (
            run_id       text   NOT NULL,
            step         text   NOT NULL,
            ref          text   NOT NULL,
            version      int    NOT NULL,
            decision_id  text   NOT NULL,
            partition    int    NOT NULL,
            recorded_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, step, ref)
        )
        """,
        "CREATE INDEX IF NOT EXISTS decision_reads_by_ref ON decision_reads (ref, partition)",
    ),
)
