"""The projection: copies the event log into PostgreSQL for queries, audit and the CLI.

Idempotent by event id, so replaying topics over an existing database changes nothing, and
replaying them into an empty one rebuilds it.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel
from streamagent.processors.projection.memory import project_versions
from streamagent.processors.projection.queries import QUALITY_COLUMNS, QualityRow, quality_row
from streamagent.processors.projection.schema import SCHEMA
from streamagent.processors.workflow import WorkflowError, load_workflows

from streamagent import codec, db, metrics
from streamagent.authn import ROLE_PATTERN, TRUSTED_WRITERS, Authenticator, Unauthenticated, tool_role
from streamagent.config import Settings
from streamagent.events import (
    STALE_MEMORY,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    CommandLost,
    CommandResent,
    DecisionRecorded,
    EntityVersion,
    Event,
    MemoryChanged,
    RunCancelRequested,
    RunCompleted,
    RunDeadlineExceeded,
    RunFailed,
    RunRequested,
    ToolCommand,
    ToolResult,
)
from streamagent.runtime import Batch, ConsumerRuntime
from streamagent.signing import verify
from streamagent.topics import COMMANDS_PREFIX, MEMORY, RUN_EVENTS, TOOL_RESULTS

log = logging.getLogger(__name__)
PROCESSOR = "projection"


def _short(data: dict[str, object], limit: int = 160) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# The arguments that say what a command would do, most telling first (the recipient before the subject).
_TELLING = ("to", "subject", "channel", "key", "name", "domain", "amount", "text", "body")


def telling_arguments(arguments: dict[str, Any], width: int = 48) -> str:
    """Two arguments that say what a command does (``to=… subject=…``), each cut to ``width``."""
    scalars = {k: v for k, v in arguments.items() if isinstance(v, str | int | float | bool)}
    chosen = [k for k in _TELLING if k in scalars][:2] or sorted(scalars)[:2]
    shown = []
    for name in chosen:
        text = str(scalars[name]).replace("\n", " ")
        shown.append(f"{name}={text if len(text) <= width else text[: width - 1] + '…'}")
    return " ".join(shown) or "(no arguments)"


# A memory change that came after the step's effect is kept (the effect is not undone) and said so, with how
# long after: "decided on contact/acme.io v3; v4 arrived since, 2 s after the step's effect (kept)".
AFTER_EFFECT_SQL = (
    "UPDATE run_events m SET summary = m.summary || ', ' || round(extract(epoch FROM"
    " ((m.payload->>'as_of')::timestamptz - r.occurred_at)))::text || ' s after the step''s effect (kept)'"
    " FROM run_events r WHERE m.event_id = ANY(%s) AND r.run_id = m.run_id AND r.type = 'ToolResult'"
    " AND r.step = m.step AND r.payload->>'status' = 'succeeded' AND r.payload->>'operation' = 'execute'"
    " AND (m.payload->>'as_of')::timestamptz >= r.occurred_at AND m.summary NOT LIKE '%%(kept)'"
)


def _read(memory: dict[str, int]) -> str:
    """`` [read contact/acme.io v3]``: the shared memory a decision was based on (v0: memory had none)."""
    if not memory:
        return ""
    return (
        " [read "
        + ", ".join(f"{ref} v{version}" if version else f"{ref} (none)" for ref, version in sorted(memory.items()))
        + "]"
    )


def summarize(event: Event) -> tuple[str | None, str]:
    """(step, one-line summary) for the timeline."""
    match event:
        case RunRequested() if event.is_child:
            return None, (
                f"child run of {event.parent_run_id} (step {event.parent_step}): {event.workflow} of"
                f" {event.company_name} ({event.company_domain})"
            )
        case RunRequested():
            return None, (
                f"{event.requested_by} requested {event.workflow} of {event.company_name} ({event.company_domain}),"
                f" contact {event.contact_name} <{event.contact_email}>"
            )
        case DecisionRecorded():
            # A fan-out names every step it starts: "decided dispatch crm + jira".
            target = f" {' + '.join(d.step for d in event.dispatched())}" if event.parallel else ""
            target = target or (f" {event.step}" if event.step else "")
            guard = ""
            if event.guard_outcome is not None:
                why = f": {event.guard_reason}" if event.guard_reason else ""
                guard = f" [guard {event.guard_outcome}{why}; policy {event.policy_version}]"
            return event.step, (
                f"decided {event.action.value}{target} on state v{event.based_on_version}"
                f" [{event.decider}]: {event.reason}{guard}{_read(event.memory)}"
            )
        case ApprovalRequested():
            return event.step, (
                f"approval requested for {event.tool} {telling_arguments(event.arguments)}: {event.reason}"
                f" (expires {event.expires_at.isoformat(timespec='seconds')})"
            )
        case ApprovalGranted():
            return event.step, f"approved by {event.by}" + (f": {event.note}" if event.note else "")
        case ApprovalDenied():
            return event.step, f"denied by {event.by}" + (f": {event.note}" if event.note else "")
        case ApprovalExpired():
            return event.step, "approval request expired unanswered"
        case ToolCommand():
            return event.step, f"command {event.operation} → {event.tool} {_short(event.arguments, 100)}"
        case ToolResult() if event.error_kind == STALE_MEMORY:
            return event.step, f"{event.tool} not called, to be decided again: {event.error}"
        case ToolResult():
            outcome = (
                _short(event.output) if event.status.value == "succeeded" else f"{event.error_kind}: {event.error}"
            )
            asked = f" [asked model {event.model}]" if event.model else ""
            return event.step, (
                f"{event.tool} {event.status.value} after {event.attempts} attempt(s),"
                f" {event.duration_ms} ms{asked}: {outcome}"
            )
        case MemoryChanged():
            before = f"v{event.read_version}" if event.read_version else "none"
            after = f"v{event.version}" if event.version else "a deletion"
            return event.step, f"decided on {event.ref} {before}; {after} arrived since"
        case RunCompleted():
            return None, f"completed: {event.reason}"
        case RunFailed():
            return event.failed_step, f"{event.status.value}: {event.reason}"
        case RunCancelRequested():
            return None, "cancel requested: " + event.says
        case RunDeadlineExceeded():
            return None, f"deadline {event.deadline_at.isoformat()} passed"
        case CommandLost():
            verdict = "giving up" if event.give_up else f"re-drive {event.redrive}"
            return event.step, f"{event.tool} command lost ({verdict}): {event.evidence}"
        case CommandResent():
            return event.step, (
                f"{event.tool} command re-sent ({event.redrive}) to partition {event.command_partition}"
                f" @ {event.command_offset}"
            )
    return None, event.type


# The decider name of the rules list; any other decider is a model (its decisions are counted as such).
RULES_DECIDER = "rules"


def _costs(event: Event) -> bool:
    """Whether the event changes a run's tokens, cost or model-decision count: a decision, or the result
    of a tool that asked a model (its tokens count in the run's like the decider's)."""
    if isinstance(event, ToolResult):
        return bool(event.prompt_tokens or event.completion_tokens or event.cost_usd)
    if not isinstance(event, DecisionRecorded):
        return False
    return bool(
        event.decider != RULES_DECIDER
        or event.prompt_tokens
        or event.completion_tokens
        or event.cost_usd
        or event.context.get("tokens_estimated") is True
    )


def workflow_steps(settings: Settings) -> dict[str, int]:
    """Steps per workflow, from the workflow files: each run's minimum. A malformed file leaves every
    workflow unknown (NULL minimum) rather than stopping the projection: the state processor refuses
    it at start already, and the audit copy of the log must keep flowing."""
    try:
        return {name: len(w.steps) for name, w in load_workflows(settings.workflows_dir).items()}
    except (WorkflowError, OSError) as exc:
        log.warning("workflow files unreadable, runs get no step minimum: %s", exc)
        return {}


# Quality signals of the ended runs among ``%(runs)s``, recomputed from their projected events (never
# added to), so a batch delivered twice or a replay over an existing database changes nothing.
# Decisions and results are counted by their ids, not their events: a re-emitted decision or a result
# published again counts once. A tool call is a dispatch or an undo the guard let through (one it held
# for approval or refused sent no command). Approvals come from the ``approvals`` table (projected
# just before, in the same transaction): one row per request, settled by its first grant, denial or
# expiry; the wait is request to answer, and an unanswered request is an approval without a wait.
# RETURNING hands back what the metrics count, whether they had counted the run already, and what
# they counted then (a late event adds its difference).
#
# Its arrays go in binary (%b): in text, psycopg quotes and escapes every element of every array in Python
# (each JSON payload character by character), which was half the projection's CPU (py-spy, 2026-12-07);
# binary sends each element with its length, a third of that cost.
_INSERT_EVENTS = (
    "INSERT INTO run_events (event_id, run_id, type, occurred_at, causation_id, step, summary,"
    " payload, topic, kafka_partition, kafka_offset)"
    " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[], %b::text[],"
    " %b::text[], %b::jsonb[], %b::text[], %b::int[], %b::bigint[])"
    " ON CONFLICT (event_id) DO NOTHING"
)

_QUALITY_UPDATE = f"""
WITH ended AS (
    SELECT run_id, quality_counted, tool_calls, retries, guard_refusals, approvals,
        cardinality(approval_waits_s) AS waits
    FROM runs WHERE run_id = ANY(%(runs)s) AND ended_at IS NOT NULL FOR UPDATE
), decided AS (
    SELECT e.run_id,
        count(DISTINCT e.payload->>'decision_id') AS decisions,
        count(DISTINCT e.payload->>'decision_id') FILTER (
            WHERE e.payload->>'action' IN ('dispatch', 'compensate')
            AND e.payload->>'guard_outcome' IS DISTINCT FROM 'approval'
            AND e.payload->>'guard_outcome' IS DISTINCT FROM 'refused'
        ) + coalesce(sum(jsonb_array_length(e.payload->'parallel')) FILTER (
            -- a fan-out's further commands (one row per decision: events are projected by id)
            WHERE e.payload->>'action' = 'dispatch' AND jsonb_typeof(e.payload->'parallel') = 'array'
        ), 0) AS tool_calls,
        count(DISTINCT e.payload->>'decision_id')
            FILTER (WHERE e.payload->>'guard_outcome' = 'refused') AS guard_refusals
    FROM run_events e JOIN ended USING (run_id) WHERE e.type = 'DecisionRecorded' GROUP BY e.run_id
), results AS (
    SELECT run_id, sum(attempts) AS tool_attempts, sum(attempts - 1) AS retries FROM (
        SELECT e.run_id, max((e.payload->>'attempts')::int) AS attempts
        FROM run_events e JOIN ended USING (run_id) WHERE e.type = 'ToolResult'
        GROUP BY e.run_id, e.payload->>'command_id', e.payload->>'operation'
    ) per_command GROUP BY run_id
), asked AS (
    SELECT a.run_id, count(*) AS approvals,
        coalesce(
            array_agg(extract(epoch FROM a.decided_at - a.requested_at)::float8 ORDER BY a.requested_at, a.request_id)
                FILTER (WHERE a.decided_at IS NOT NULL),
            '{{}}'
        ) AS waits
    FROM approvals a JOIN ended USING (run_id) GROUP BY a.run_id
), remembered AS (
    SELECT e.run_id,
        count(DISTINCT e.event_id) FILTER (
            WHERE e.type = 'ToolResult' AND e.payload->>'error_kind' = 'stale-memory'
        ) AS stale_memory,
        count(DISTINCT e.event_id) FILTER (WHERE e.type = 'MemoryChanged' AND e.summary LIKE '%%(kept)')
            AS memory_after_effect
    FROM run_events e JOIN ended USING (run_id) WHERE e.type IN ('ToolResult', 'MemoryChanged') GROUP BY e.run_id
)
UPDATE runs SET
    decisions = coalesce(decided.decisions, 0),
    tool_calls = coalesce(decided.tool_calls, 0),
    guard_refusals = coalesce(decided.guard_refusals, 0),
    tool_attempts = coalesce(results.tool_attempts, 0),
    retries = coalesce(results.retries, 0),
    approvals = coalesce(asked.approvals, 0),
    approval_waits_s = coalesce(asked.waits, '{{}}'),
    stale_memory = coalesce(remembered.stale_memory, 0),
    memory_after_effect = coalesce(remembered.memory_after_effect, 0),
    duration_s = extract(epoch FROM runs.ended_at - runs.created_at)::float8,
    quality_counted = true
FROM ended LEFT JOIN decided USING (run_id) LEFT JOIN results USING (run_id) LEFT JOIN asked USING (run_id)
    LEFT JOIN remembered USING (run_id)
WHERE runs.run_id = ended.run_id
RETURNING ended.quality_counted, ended.tool_calls, ended.retries, ended.guard_refusals, ended.approvals,
    ended.waits, {", ".join("runs." + c for c in QUALITY_COLUMNS.split(", "))}
"""


class ProjectionHandler:
    """Projects a batch in one transaction, sent as one pipeline (one round trip in the steady state).

    Every statement is idempotent (events by id, runs by upsert, counts recomputed), so a batch
    delivered again after a crash changes nothing.
    """

    def __init__(
        self, settings: Settings, steps_of: dict[str, int] | None = None, authenticator: Authenticator | None = None
    ) -> None:
        # Only events that verify as written by their component are projected (streamagent.authn):
        # a forged event gets no row, no timeline line, no run. None: unit tests of the SQL alone.
        self.authenticator = authenticator
        # Each workflow's step count, loaded once (as the state processor lays runs out at its start).
        self.steps_of = workflow_steps(settings) if steps_of is None else steps_of
        # Reconnected on use after PostgreSQL restarts; a batch whose transaction failed is retried
        # whole by the runtime.
        self.db = db.Reconnecting(settings.database_url, autocommit=False)
        # The batch's entity versions (from the memory topic) and their messages, projected on their own.
        self.versions: list[tuple[EntityVersion, Any]] = []
        self.max_event_bytes = settings.max_event_bytes
        # The role each message of the batch verified as (``decode``), by (topic, partition, offset): the
        # MAC is checked once, before decoding, and ``_unauthenticated`` reuses the answer.
        self.writers: dict[tuple[str, int, int], str] = {}

    def decode(self, msg: Any) -> BaseModel:
        """The runtime's decoder: an event verified as written by a core role is not validated again."""
        writer = None
        if self.authenticator is not None:
            writer = self.authenticator.verified_writer(msg.value(), msg.headers())
            if writer is not None:
                self.writers[(msg.topic(), msg.partition(), msg.offset())] = writer
        return codec.decode(msg.value(), self.max_event_bytes, trusted=writer in TRUSTED_WRITERS)

    def __call__(self, batch: Batch) -> None:
        rows, events = self.rows(batch)
        if self.versions:
            with self.db.conn.transaction(), self.db.conn.cursor() as cur:
                project_versions(cur, self.versions)
        if not rows:
            return
        conn = self.db.conn
        # The quality statement has a cursor of its own, read once the pipeline is synced: reading
        # it inside would cost the batch a round trip more.
        with conn.transaction(), conn.cursor() as quality:
            with conn.pipeline(), conn.cursor() as cur:
                # One statement per batch, not one per event: the rows travel as one array per column
                # (bench/per_run_costs.py counted 15 INSERTs per run before, each planned and executed).
                cur.execute(_INSERT_EVENTS, [list(column) for column in zip(*rows, strict=True)])
                self._update_runs(cur, events)
                changed = [e.event_id for e in events if isinstance(e, MemoryChanged)]
                if changed:
                    cur.execute(AFTER_EFFECT_SQL, (changed,))
                asked = self._update_quality(quality, events)
            changed = self._quality_changes(quality) if asked else []
        # Counted once the transaction is committed: a batch that failed and is retried counts once.
        for quality, before in changed:
            if before is None:
                metrics.run_ended(quality)
            else:
                metrics.run_changed(quality, before)

    def rows(self, batch: Batch) -> tuple[list[tuple[object, ...]], list[Event]]:
        """The batch's ``run_events`` rows and their events (anything else is rejected)."""
        rows: list[tuple[object, ...]] = []
        events: list[Event] = []
        self.versions = []
        for item in batch:
            event = item.event
            if isinstance(event, EntityVersion):
                problem = self._unauthenticated(event, item.message)
                if problem is not None:
                    batch.reject(item, "unauthenticated", problem)
                else:
                    self.versions.append((event, item.message))
                continue
            if not isinstance(event, Event):
                batch.reject(item, "unexpected-event", f"{type(event).__name__} is not a run event")
                continue
            msg = item.message
            problem = self._unauthenticated(event, msg)
            if problem is not None:
                batch.reject(item, "unauthenticated", problem)
                continue
            step, summary = summarize(event)
            payload = self._payload(event)
            rows.append(
                (
                    event.event_id,
                    event.run_id,
                    event.type,
                    event.occurred_at,
                    event.causation_id,
                    step,
                    summary,
                    payload,
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                )
            )
            events.append(event)
        self.writers.clear()
        return rows, events

    def _unauthenticated(self, event: Event | EntityVersion, msg: Any) -> str | None:
        """Why ``event`` must not be projected (None: it verifies). A command is checked as its tool checks it."""
        if self.authenticator is None:
            return None
        if isinstance(event, ToolCommand):
            if not ROLE_PATTERN.match(tool_role(event.tool)):  # no tool has that name: no key signs for it
                return f"command for {event.tool[:64]!r}, which is not a tool name"
            problem = verify(event, self.authenticator.keys_of(tool_role(event.tool)))
            return None if problem is None else f"command: {problem}"
        writer = self.writers.get((msg.topic(), msg.partition(), msg.offset()))
        try:
            self.authenticator.verify(event, msg.value(), msg.headers(), writer)
        except Unauthenticated as exc:
            return str(exc)
        return None

    @staticmethod
    def _payload(event: Event) -> object:
        """The event as the ``payload`` column's parameter: its JSON text, cast to jsonb by the statement.
        pydantic's serializer writes it in one step, a third of the cost of a dict dumped by ``json``."""
        return event.model_dump_json()

    def _update_quality(self, cur: psycopg.Cursor[Any], events: list[Event]) -> bool:
        """Recompute the quality signals of the batch's runs that have ended (whether a statement was sent)."""
        # Any event of an ended run may change its figures (a result on its own topic can be copied
        # after the run's end); the statement only touches ended runs, so running runs cost one index probe.
        touched = sorted({e.run_id for e in events if not isinstance(e, ToolCommand)})
        if not touched:
            return False
        self.recompute_quality(cur, touched)
        return True

    @staticmethod
    def recompute_quality(cur: psycopg.Cursor[Any], runs: list[str]) -> None:
        """Recompute the quality signals of those of ``runs`` that have ended (rows to fetch: what changed)."""
        cur.execute(_QUALITY_UPDATE, {"runs": runs})

    @staticmethod
    def _quality_changes(cur: psycopg.Cursor[Any]) -> list[tuple[QualityRow, metrics.CountedQuality | None]]:
        """The recomputed runs, each with what the metrics counted of it before (None: nothing yet, it
        ended in this batch or this database is new)."""
        return [(quality_row(row[6:]), metrics.CountedQuality(*row[1:6]) if row[0] else None) for row in cur.fetchall()]

    def backfill_quality(self, chunk: int = 1000) -> int:
        """Compute the quality signals of runs that ended before this database had them (projected by an
        earlier version), ``chunk`` runs per transaction. They are marked counted and not counted: they
        ended before this process started, and a burst of old runs would fake a rate."""
        names, steps = list(self.steps_of), list(self.steps_of.values())
        conn, filled = self.db.conn, 0
        while True:
            with conn.transaction():
                ids = [
                    run_id
                    for (run_id,) in conn.execute(
                        "SELECT run_id FROM runs WHERE ended_at IS NOT NULL AND duration_s IS NULL"
                        " ORDER BY run_id LIMIT %s",
                        (chunk,),
                    )
                ]
                if not ids:
                    return filled
                conn.execute(
                    "UPDATE runs SET workflow_steps = w.steps FROM unnest(%s::text[], %s::int[]) AS w(name, steps)"
                    " WHERE runs.run_id = ANY(%s) AND runs.workflow = w.name AND runs.workflow_steps IS NULL",
                    (names, steps, ids),
                )
                updated = conn.execute(_QUALITY_UPDATE, {"runs": ids}).rowcount
            filled += len(ids)
            if updated < len(ids):  # cannot happen (an ended run gets a duration); never loop on it
                return filled

    def _update_runs(self, cur: psycopg.Cursor[Any], events: list[Event]) -> None:
        # Runs arrive on several topics, so any event may be the first one seen for its run.
        spans: dict[str, tuple[datetime, datetime]] = {}
        for e in events:
            first, last = spans.get(e.run_id, (e.occurred_at, e.occurred_at))
            spans[e.run_id] = (min(first, e.occurred_at), max(last, e.occurred_at))
        cur.execute(
            "INSERT INTO runs (run_id, status, created_at, updated_at)"
            " SELECT run_id, 'running', first, last FROM unnest(%s::text[], %s::timestamptz[], %s::timestamptz[])"
            " AS s(run_id, first, last)"
            " ON CONFLICT (run_id) DO UPDATE SET updated_at = GREATEST(runs.updated_at, EXCLUDED.updated_at)",
            [list(spans), [first for first, _ in spans.values()], [last for _, last in spans.values()]],
        )
        requested = [e for e in events if isinstance(e, RunRequested)]
        if requested:
            # One statement per batch (as every per-run update below): a run was created when it was
            # requested (the upstream's time), so the list orders runs so, whatever events of the run
            # were projected first.
            cur.execute(
                "UPDATE runs r SET company_name=u.company_name, company_domain=u.company_domain,"
                " contact_email=u.contact_email, requested_by=u.requested_by, workflow=u.workflow,"
                " workflow_steps=u.workflow_steps, created_at=u.created_at, parent_run_id=u.parent_run_id,"
                " parent_step=u.parent_step"
                " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[],"
                " %s::timestamptz[], %s::text[], %s::text[]) AS u(run_id, company_name, company_domain,"
                " contact_email, requested_by, workflow, workflow_steps, created_at, parent_run_id, parent_step)"
                " WHERE r.run_id = u.run_id",
                [
                    [e.run_id for e in requested],
                    [e.company_name for e in requested],
                    [e.company_domain for e in requested],
                    [e.contact_email for e in requested],
                    [e.requested_by for e in requested],
                    [e.workflow for e in requested],
                    [self.steps_of.get(e.workflow) for e in requested],
                    [e.occurred_at for e in requested],
                    [e.parent_run_id for e in requested],
                    [e.parent_step for e in requested],
                ],
            )
        self._recount(cur, *self.recounted(events))
        # A running run shows what it waits for (e.g. "waiting for tool crm") until a step is dispatched.
        last: dict[str, DecisionRecorded] = {}  # per run, its latest wait or dispatch in this batch
        for e in events:
            if isinstance(e, DecisionRecorded) and e.action.value in ("wait", "dispatch"):
                last[e.run_id] = e
        dispatched = sorted(r for r, e in last.items() if e.action.value == "dispatch")
        if dispatched:  # one statement per batch; it touches only runs that were waiting
            cur.execute(
                "UPDATE runs SET reason=NULL WHERE run_id = ANY(%s) AND status='running' AND reason IS NOT NULL",
                (dispatched,),
            )
        waits = [(e.reason, r) for r, e in last.items() if e.action.value == "wait"]
        if waits:
            cur.execute(
                "UPDATE runs r SET reason=u.reason FROM unnest(%s::text[], %s::text[]) AS u(reason, run_id)"
                " WHERE r.run_id = u.run_id AND r.status='running'",
                [[reason for reason, _ in waits], [run_id for _, run_id in waits]],
            )
        completed = [e for e in events if isinstance(e, RunCompleted)]
        if completed:
            cur.execute(
                "UPDATE runs r SET status='completed', reason=u.reason, ended_at=u.ended_at"
                " FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS u(run_id, reason, ended_at)"
                " WHERE r.run_id = u.run_id",
                [[e.run_id for e in completed], [e.reason for e in completed], [e.occurred_at for e in completed]],
            )
        failed = [e for e in events if isinstance(e, RunFailed)]
        if failed:
            cur.executemany(
                "UPDATE runs SET status=%s, reason=%s, failed_step=%s, ended_at=%s WHERE run_id=%s",
                [(e.status.value, e.reason, e.failed_step, e.occurred_at, e.run_id) for e in failed],
            )
        self._approvals(cur, events)

    @staticmethod
    def recounted(events: list[Event]) -> tuple[list[str], list[str]]:
        """(runs whose ``steps_done``, runs whose tokens and cost) ``events`` may change."""
        counted = sorted({e.run_id for e in events if isinstance(e, ToolResult) and e.operation == "execute"})
        costed = sorted({e.run_id for e in events if _costs(e)})
        return counted, costed

    def _recount(self, cur: psycopg.Cursor[Any], counted: list[str], costed: list[str]) -> None:
        """Recompute from ``run_events`` the steps done of ``counted`` and the costs of ``costed``."""
        if counted:
            cur.execute(
                "UPDATE runs SET steps_done = (SELECT count(DISTINCT step) FROM run_events"
                " WHERE run_events.run_id=runs.run_id AND type='ToolResult' AND payload->>'status'='succeeded'"
                " AND payload->>'operation'='execute') WHERE run_id = ANY(%s)",
                (counted,),
            )
        # Tokens and cost are recomputed from the run's recorded decisions rather than added up, so a
        # batch delivered twice (or a replay over an existing database) cannot count a decision twice.
        # Only runs with a decision that adds something are touched: a rules decision costs nothing,
        # and the rules-only hot path keeps its statement count.
        if costed:
            cur.execute(
                "UPDATE runs SET (prompt_tokens, completion_tokens, cost_usd, model_decisions, estimated_decisions) ="
                " (SELECT coalesce(sum((payload->>'prompt_tokens')::bigint), 0),"
                " coalesce(sum((payload->>'completion_tokens')::bigint), 0),"
                " coalesce(sum((payload->>'cost_usd')::numeric), 0),"
                " count(*) FILTER (WHERE type = 'DecisionRecorded' AND payload->>'decider' <> %s),"
                " count(*) FILTER (WHERE payload->'context'->'tokens_estimated' = 'true'::jsonb)"
                " FROM run_events WHERE run_events.run_id = runs.run_id"
                " AND type IN ('DecisionRecorded', 'ToolResult'))"
                " WHERE run_id = ANY(%s)",
                (RULES_DECIDER, costed),
            )

    @staticmethod
    def _approvals(cur: psycopg.Cursor[Any], events: list[Event]) -> None:
        """Requests inserted once; an answer settles only a pending request (the fold's rule)."""
        asked = [e for e in events if isinstance(e, ApprovalRequested)]
        if asked:
            cur.executemany(
                "INSERT INTO approvals (request_id, run_id, step, tool, arguments, reason, policy_version, status,"
                " requested_at, expires_at) VALUES (%s,%s,%s,%s,%s,%s,%s,'requested',%s,%s)"
                " ON CONFLICT (request_id) DO NOTHING",
                [
                    (
                        e.request_id,
                        e.run_id,
                        e.step,
                        e.tool,
                        Jsonb(e.arguments),
                        e.reason,
                        e.policy_version,
                        e.occurred_at,
                        e.expires_at,
                    )
                    for e in asked
                ],
            )
        answers: list[tuple[object, ...]] = []
        for e in events:
            if isinstance(e, ApprovalGranted | ApprovalDenied):
                status = "granted" if isinstance(e, ApprovalGranted) else "denied"
                answers.append((status, e.by, e.note or None, e.occurred_at, e.request_id))
            elif isinstance(e, ApprovalExpired):
                answers.append(("expired", None, None, e.occurred_at, e.request_id))
        if answers:
            cur.executemany(
                "UPDATE approvals SET status=%s, decided_by=%s, note=%s, decided_at=%s"
                " WHERE request_id=%s AND status='requested'",
                answers,
            )


def build(settings: Settings) -> ConsumerRuntime:
    db.migrate(settings, SCHEMA, wait_s=db.WAIT_FOREVER)  # started during an outage: wait, do not crash-loop
    commands = "^" + re.escape(settings.topic(COMMANDS_PREFIX)) + ".*"
    topics = [settings.topic(RUN_EVENTS), settings.topic(TOOL_RESULTS), commands, settings.topic(MEMORY)]
    handler = ProjectionHandler(settings, authenticator=Authenticator.of(settings))
    try:
        filled = handler.backfill_quality()
        if filled:
            log.info("quality signals computed for %d runs that ended before this version", filled)
    except psycopg.Error as exc:  # best effort: the next start tries again; projecting matters more
        handler.db.discard()
        log.warning("quality signals of earlier runs not computed (tried again at the next start): %r", exc)
    runtime = ConsumerRuntime(settings, PROCESSOR, topics, handler, dependencies=("kafka", "postgres"))
    runtime.decoder = handler.decode
    return runtime
