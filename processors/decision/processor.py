"""The decision processor: one snapshot in, at most one recorded decision and its follow-up out.

Invariant: one decision per (run, state version). The decision and its follow-up event (a tool
command or the run's end) are written to PostgreSQL before they are produced, so a redelivered
snapshot re-emits exactly the recorded bytes and never asks the decider again. A snapshot older
than one already seen for the run is superseded: nothing is decided on stale state.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from confluent_kafka import Producer

from processors.decision.decider import Decider, Decision
from processors.workflow import ONBOARDING
from streamagent import codec, db
from streamagent.config import Settings
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    Event,
    FailureStatus,
    RunCompleted,
    RunFailed,
    StateSnapshot,
    StepStatus,
    ToolCommand,
    now,
    stable_id,
)
from streamagent.metrics import DECISIONS
from streamagent.runtime import ConsumerRuntime, Incoming, Unprocessable
from streamagent.topics import RUN_EVENTS, RUN_STATE, command_topic

log = logging.getLogger(__name__)
PROCESSOR = "decision"


def command_id(run_id: str, step: str, operation: str = "execute") -> str:
    """Stable per (run, step, operation): however often a step is decided, its effect has one key."""
    return stable_id(run_id, step, operation)


def follow_up(settings: Settings, snap: StateSnapshot, decision: Decision, decision_id: str) -> tuple[str, Event]:
    """The event a decision sends into the world, and the topic it goes to."""
    if decision.action in (DecisionAction.dispatch, DecisionAction.compensate):
        assert decision.step is not None and decision.tool is not None
        operation = "compensate" if decision.action is DecisionAction.compensate else "execute"
        cid = command_id(snap.run_id, decision.step, operation)
        # An undo runs after the run's deadline by definition; it gets its own.
        limit = now() + timedelta(seconds=settings.command_deadline_s)
        deadline = limit if operation == "compensate" else min(snap.deadline_at, limit)
        command = ToolCommand(
            event_id=stable_id(cid, "command"),
            run_id=snap.run_id,
            causation_id=decision_id,
            command_id=cid,
            decision_id=decision_id,
            tool=decision.tool,
            step=decision.step,
            operation=operation,
            arguments=decision.arguments,
            deadline_at=deadline,
        )
        return settings.topic(command_topic(decision.tool)), command
    if decision.action is DecisionAction.complete:
        done = RunCompleted(
            event_id=stable_id(snap.run_id, "completed"),
            run_id=snap.run_id,
            causation_id=decision_id,
            decision_id=decision_id,
            results=snap.results(),
            reason=decision.reason,
        )
        return settings.topic(RUN_EVENTS), done
    status = FailureStatus.escalated if decision.action is DecisionAction.escalate else FailureStatus.failed
    ended = RunFailed(
        event_id=stable_id(snap.run_id, "ended"),
        run_id=snap.run_id,
        causation_id=decision_id,
        decision_id=decision_id,
        status=status,
        reason=decision.reason,
        failed_step=decision.step,
        results=snap.results(),
    )
    return settings.topic(RUN_EVENTS), ended


# A recorded decision as stored: its event, and the topic and bytes of the follow-up it caused.
Stored = tuple[bytes, str | None, bytes | None]


def _stored(decision: bytes, topic: str | None, follow: bytes | None) -> Stored:
    return bytes(decision), topic, bytes(follow) if follow is not None else None


class DecisionHandler:
    def __init__(self, settings: Settings, decider: Decider, producer: Producer) -> None:
        self.settings = settings
        self.decider = decider
        self.producer = producer
        self.conn = db.connect(settings)

    def __call__(self, incoming: Incoming) -> None:
        snap = incoming.event
        if not isinstance(snap, StateSnapshot):
            raise Unprocessable("unexpected-event", f"{type(snap).__name__} on the snapshot topic")
        recorded = self._recorded(snap)
        if recorded is not None:
            DECISIONS.labels(self.decider.name, "replayed").inc()
            self._emit(snap.run_id, *recorded)
            return
        latest, seen_before = self._progress(snap)
        if latest > snap.version:
            DECISIONS.labels(self.decider.name, "superseded").inc()
            log.info("snapshot superseded", extra={"run_id": snap.run_id, "version": snap.version})
            return
        pending = self._pending(snap)
        if pending is not None:
            # One decision in flight per run: the state has not taken the last one in yet, so this
            # snapshot cannot show its effect, and deciding now would decide the same thing again.
            if seen_before:
                DECISIONS.labels(self.decider.name, "redriven").inc()
                self._emit(snap.run_id, *pending)
            else:
                DECISIONS.labels(self.decider.name, "waiting").inc()
            return
        decision = self.decider.decide(snap)
        if decision is None:
            if seen_before:
                self._redrive(snap)
            else:
                DECISIONS.labels(self.decider.name, "waiting").inc()
            return
        decision_id = stable_id(snap.run_id, "decision", str(snap.version))
        topic, event = follow_up(self.settings, snap, decision, decision_id)
        record = DecisionRecorded(
            event_id=decision_id,
            run_id=snap.run_id,
            causation_id=snap.last_event_id,
            decision_id=decision_id,
            based_on_version=snap.version,
            action=decision.action,
            step=decision.step,
            tool=decision.tool,
            command_id=getattr(event, "command_id", None),
            arguments=decision.arguments,
            reason=decision.reason,
            decider=self.decider.name,
            context=decision.context,
            prompt_tokens=decision.prompt_tokens,
            completion_tokens=decision.completion_tokens,
            cost_usd=decision.cost_usd,
        )
        stored = self._store(snap, record, topic, codec.encode(event))
        DECISIONS.labels(self.decider.name, "recorded").inc()
        log.info(
            "decided %s %s",
            decision.action.value,
            decision.step or "",
            extra={"run_id": snap.run_id, "version": snap.version, "decision_id": decision_id},
        )
        self._emit(snap.run_id, *stored)

    def _recorded(self, snap: StateSnapshot) -> Stored | None:
        row = self.conn.execute(
            "SELECT decision_event, follow_up_topic, follow_up_event FROM decisions"
            " WHERE run_id = %s AND based_on_version = %s",
            (snap.run_id, snap.version),
        ).fetchone()
        return _stored(*row) if row else None

    def _pending(self, snap: StateSnapshot) -> Stored | None:
        row = self.conn.execute(
            "SELECT decision_id, decision_event, follow_up_topic, follow_up_event FROM decisions"
            " WHERE run_id = %s ORDER BY based_on_version DESC LIMIT 1",
            (snap.run_id,),
        ).fetchone()
        if row is None or row[0] == snap.last_decision_id:
            return None
        return _stored(*row[1:])

    def _progress(self, snap: StateSnapshot) -> tuple[int, bool]:
        """Record that this version was seen; returns (latest version seen, seen this one before)."""
        previous = self.conn.execute(
            "SELECT latest_version FROM decision_progress WHERE run_id = %s", (snap.run_id,)
        ).fetchone()
        if previous is None and snap.version > 1:
            # Snapshots of a run start at version 1 and arrive in order on one partition, so a
            # later version of a run this processor never saw did not come from the state processor.
            raise Unprocessable("unknown-run", f"snapshot v{snap.version} of run {snap.run_id} never seen before")
        row = self.conn.execute(
            "INSERT INTO decision_progress (run_id, latest_version) VALUES (%s, %s)"
            " ON CONFLICT (run_id) DO UPDATE SET latest_version ="
            " GREATEST(decision_progress.latest_version, EXCLUDED.latest_version),"
            " superseded = decision_progress.superseded"
            " + CASE WHEN decision_progress.latest_version > EXCLUDED.latest_version THEN 1 ELSE 0 END"
            " RETURNING latest_version",
            (snap.run_id, snap.version),
        ).fetchone()
        assert row is not None
        return int(row[0]), previous is not None and int(previous[0]) >= snap.version

    def _redrive(self, snap: StateSnapshot) -> None:
        """A snapshot seen before, with a step still in flight: send that step's command again.

        The state processor re-publishes the snapshot of a run that stopped moving; the command may
        have been lost, or its result. The command keeps its id, so the tool either runs it (if it
        never did) or republishes the result it recorded.
        """
        waiting = (StepStatus.dispatched, StepStatus.compensating)
        in_flight = [s.decision_id for s in snap.steps if s.status in waiting and s.decision_id]
        for decision_id in in_flight:
            row = self.conn.execute(
                "SELECT follow_up_topic, follow_up_event FROM decisions WHERE decision_id = %s", (decision_id,)
            ).fetchone()
            if row is not None and row[0] is not None:
                self.producer.produce(row[0], key=snap.run_id.encode(), value=bytes(row[1]))
                DECISIONS.labels(self.decider.name, "redriven").inc()
                log.info("re-sent in-flight command", extra={"run_id": snap.run_id, "decision_id": decision_id})

    def _store(self, snap: StateSnapshot, record: DecisionRecorded, topic: str, follow: bytes) -> Stored:
        encoded = codec.encode(record)
        inserted = self.conn.execute(
            "INSERT INTO decisions (run_id, based_on_version, decision_id, action, step,"
            " decision_event, follow_up_topic, follow_up_event) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING 1",
            (
                snap.run_id,
                snap.version,
                record.decision_id,
                record.action.value,
                record.step,
                encoded,
                topic,
                follow,
            ),
        ).fetchone()
        if inserted is None:  # another instance recorded it first: emit theirs, not ours
            existing = self._recorded(snap)
            assert existing is not None
            return existing
        return encoded, topic, follow

    def _emit(self, run_id: str, decision: bytes, topic: str | None, follow: bytes | None) -> None:
        key = run_id.encode()
        self.producer.produce(self.settings.topic(RUN_EVENTS), key=key, value=decision)
        if topic is not None and follow is not None:
            self.producer.produce(topic, key=key, value=follow)


def make_decider(settings: Settings) -> Decider:
    if settings.decider == "rules":
        from processors.decision.rules import RulesDecider

        return RulesDecider(ONBOARDING)
    raise ValueError(f"unknown decider {settings.decider!r} (known: rules)")


def build(settings: Settings) -> ConsumerRuntime:
    db.migrate(settings)
    runtime = ConsumerRuntime(settings, PROCESSOR, [settings.topic(RUN_STATE)], lambda _: None)
    runtime.handler = DecisionHandler(settings, make_decider(settings), runtime.producer)
    return runtime
