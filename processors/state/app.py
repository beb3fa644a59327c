"""The state processor: a faust agent folds every run event into a table and publishes snapshots.

The table (backed by its changelog topic) is the working state; the snapshot topic is what the
decision layer reads. Both are derived from ``agent.run.events`` + ``agent.tool.results``.

Per batch of events (faust ``take_events``): fold each, write each changed run to the table once,
publish one snapshot per run that now needs a decision, flush, and only then let faust ack the
batch. A run gets a snapshot when the decider has something to decide (see ``fold.needs_decision``):
one snapshot and one decision per step, never an echo of the decision just recorded.

The timer looks only at what is due (``watch.DueQueue``): run deadlines, and loss checks of
in-flight commands. A command is re-driven only on evidence that it is lost: its tool's consumer
group has committed past it (a tool commits only after its result is acknowledged), and this
processor has folded the results partition of the run up to a high-water mark read after that,
and still no result. A command merely waiting in its topic is never re-sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import faust
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import KafkaException, Producer
from streamagent.processors.state.checkpoint import CheckpointedStore, checkpoint_topic, last_records, records_at
from streamagent.processors.state.checkpoint import decode as decode_checkpoint
from streamagent.processors.state.checkpoint import encode as encode_checkpoint
from streamagent.processors.state.children import parent_result, refusal_result
from streamagent.processors.state.fold import RunState, apply, in_flight, loss_checked, needs_decision
from streamagent.processors.state.offsets import FoldOffsets, Skipped, read_range
from streamagent.processors.state.store import FaustTableStore, RunStore, maybe_active
from streamagent.processors.state.watch import APPROVAL, DEADLINE, REDRIVE, RETAIN, Admission, DueQueue
from streamagent.processors.workflow import UnknownWorkflow, Workflow, Workflows, load_workflows, lookup

from streamagent import codec, faust_compat, tracing
from streamagent.authn import STATE, TRUSTED_WRITERS, Authenticator, Unauthenticated, header_value, issue
from streamagent.config import Settings
from streamagent.dlq import DeadLetterSink
from streamagent.errors import Rejected, Unprocessable
from streamagent.events import (
    ApprovalExpired,
    ApprovalStatus,
    CommandLost,
    Event,
    RunCompleted,
    RunDeadlineExceeded,
    RunFailed,
    RunRequested,
    RunStatus,
    StateSnapshot,
    StepState,
    StepStatus,
    ToolResult,
    stable_id,
)
from streamagent.kafka import admin, group_offsets
from streamagent.kafka import producer as make_producer
from streamagent.members import MemberAnnouncer, faust_partitions
from streamagent.metrics import (
    EVENTS_PROCESSED,
    REDRIVES,
    RUN_OLDEST_SECONDS,
    RUN_SECONDS,
    RUNS,
    RUNS_ADMITTED,
    RUNS_WAITING,
    SKIPPED_RECORDS,
    SNAPSHOTS,
    STEP_SECONDS,
    HopTimer,
    set_lag,
)
from streamagent.signing import CommandKeys, load_keys, sign_snapshot_bytes
from streamagent.topics import RUN_EVENTS, RUN_REQUESTS, RUN_STATE, TOOL_RESULTS, command_topic

log = logging.getLogger(__name__)
PROCESSOR = "state"
HOMES_KEPT = 100_000  # run ids whose home partition is remembered (about 10 MB)
# A partition whose end lies beyond the fold with nothing delivered for this long is read by the
# processor itself (``offsets.FoldOffsets.stalled``): several fetch waits, so a busy partition never is.
STALL_S = 3.0
# The largest checkpoint record written: under the producer's message.max.bytes (16 MB, streamagent.kafka).
CHECKPOINT_MAX_BYTES = 15 * 1024 * 1024


@dataclass
class Suspect:
    """A command its tool's group has consumed past: lost unless its result shows up by ``highwater``.

    ``highwater`` is read at the second look: by then nearly every such command's result has been
    folded (it was only queued), so the broker is asked for the end of a results partition rarely,
    and once per partition per tick.
    """

    partition: int  # the run's partition, and so the results partition its result would be on
    highwater: int | None = None


class StateWorker:
    """The fold, the snapshots, admission and the timer; faust only feeds it and keeps the table."""

    def __init__(
        self,
        settings: Settings,
        store: RunStore,
        producer: Producer,
        workflows: Workflows | None = None,
        keys: CommandKeys | None = None,
    ) -> None:
        self.settings = settings
        # Every event is folded only if it verifies as written by the component whose job it is
        # (streamagent.authn), and this processor's own timer events are signed as the state role.
        # Off only for a worker built by hand without keys (unit tests of the fold).
        self.authenticator = Authenticator(keys) if keys is not None else None
        self.signer = issue(keys, STATE) if keys is not None else None
        # Every published snapshot is signed (streamagent.signing): the decision processor decides only
        # on snapshots this processor made. None (a worker built by hand in unit tests): unsigned.
        self.keys = keys
        self.store = store
        self.producer = producer
        # Read once at start: a malformed file stops the processor here, with its file, field and reason.
        self.workflows = load_workflows(settings.workflows_dir) if workflows is None else workflows
        self.dead_letters = DeadLetterSink(settings, producer, PROCESSOR)
        self.queue = DueQueue()
        self.admission = Admission.for_stack(settings.max_running_runs, settings.partitions)
        self.cache: dict[str, RunState] = {}
        # Runs changed by the batch being folded, not yet written to the store (see ``state``).
        self._pending: dict[str, tuple[RunState, int]] = {}
        self.positions: dict[tuple[str, int], int] = {}  # folded up to (exclusive), per topic-partition
        self.suspects: dict[str, Suspect] = {}  # by command id
        self._run_of: dict[str, str] = {}  # command id -> run id, for the commands being judged
        self.checks: dict[str, int] = {}  # by command id: loss checks that found the command still queued
        self.assigned: frozenset[int] | None = None
        self._partitioner = DefaultPartitioner()
        self._all = list(range(settings.partitions))
        # Each run's home partition, computed once: aiokafka's murmur2 is pure Python, and every event
        # of a run is checked against its home (2% of this processor's CPU, py-spy 2026-12-07).
        self._homes: dict[str, int] = {}
        self._admin: Any = None
        self.results_topic = settings.topic(TOOL_RESULTS)
        self.events_topic = settings.topic(RUN_EVENTS)
        self.snapshots_topic = settings.topic(RUN_STATE)
        self.hops = HopTimer(PROCESSOR)
        self._lag_shown: set[tuple[str, int]] = set()
        self._reported_at = 0.0

    # -- state access ----------------------------------------------------------------------------
    def partition(self, run_id: str) -> int:
        home = self._homes.get(run_id)
        if home is None:
            if len(self._homes) >= HOMES_KEPT:  # bounded: a long-lived processor sees millions of runs
                self._homes.clear()
            home = self._homes[run_id] = int(self._partitioner(run_id.encode(), self._all, self._all))
        return home

    def state(self, run_id: str) -> RunState | None:
        cached = self.cache.get(run_id)
        if cached is not None:
            return cached
        # A run that ended earlier in this batch has left the cache but is not in the store yet: folding
        # its next event (the RunCompleted after the deciding "complete") on the store's older value
        # would drop the events in between (found by `streamagent replay`'s verification).
        pending = self._pending.get(run_id)
        return pending[0] if pending is not None else self.store.get(run_id)

    def workflow(self, name: str) -> Workflow:
        """The named workflow; an unknown name is refused (reason ``unknown_workflow``, dead-lettered)."""
        try:
            return lookup(self.workflows, name)
        except UnknownWorkflow as exc:
            raise Unprocessable("unknown_workflow", str(exc)) from None

    def _active(self, snap: StateSnapshot) -> bool:
        if snap.status is RunStatus.running or in_flight(snap):
            return True
        workflow = self.workflows.get(snap.request.workflow)
        return workflow is not None and workflow.undo_pending(snap)

    # -- partitions ------------------------------------------------------------------------------
    def sync_assignment(self, assigned: frozenset[int]) -> None:
        """Rebuild the due queue, admission and cache from the table when the assignment changed.

        A scan of the whole table, once per rebalance: this is the "rebuilt from the table on
        recovery" half of the timer's bargain. Runs waiting for a decision get their snapshot
        again, in case the crash that caused the rebalance lost it (the decider dedupes).
        """
        if assigned == self.assigned:
            return
        self.release()
        self.assigned = assigned
        waiting: list[tuple[datetime, str]] = []
        republish: list[RunState] = []
        expire_at = time.time() + self.settings.state_retention_s
        for run_id, value in self.store.raw_items():
            partition = self.partition(run_id)
            if partition not in assigned:
                continue
            if not maybe_active(value):
                # A finished run: not parsed, so this scan stays cheap; it leaves the table within one
                # retention from now (its end time would need parsing; an extra retention is harmless).
                if self.settings.state_retention_s > 0:
                    self.queue.schedule(partition, run_id, RETAIN, expire_at)
                continue
            state = RunState.model_validate_json(value)
            snap = state.snapshot
            if not self._active(snap):
                # Parsed (it might have had undos to send) but ended and idle: it leaves the table within
                # one retention too, or it would stay for good.
                if self.settings.state_retention_s > 0:
                    self.queue.schedule(partition, run_id, RETAIN, expire_at)
                continue
            self.cache[run_id] = state
            if not state.admitted:
                waiting.append((snap.created_at, run_id))
            else:
                if counted(snap):
                    self.admission.admit(partition, run_id)
                if snap.request.workflow in self.workflows and needs_decision(
                    snap, self.workflows[snap.request.workflow]
                ):
                    republish.append(state)
            self._schedule(partition, state)
        for _, run_id in sorted(waiting):
            self.admission.wait(self.partition(run_id), run_id)
        for state in republish:
            self._publish(state)
        self.producer.flush(30)
        self._gauges()
        log.info(
            "partitions assigned",
            extra={"partitions": sorted(assigned), "active_runs": len(self.cache), "republished": len(republish)},
        )

    def release(self) -> None:
        """Forget every per-partition piece of memory (partitions revoked, or about to be re-read).

        Called on revoke, before faust hands the partitions to another member, so the timer never acts
        (deadline, approval expiry, loss check, retention) for a partition this member no longer owns.
        """
        self.assigned = None
        self.cache.clear()
        self.suspects.clear()
        self.checks.clear()
        self.positions.clear()
        self.queue.forget_partitions(())
        self.admission.reset()
        self._run_of.clear()

    # -- the fold --------------------------------------------------------------------------------
    def fold_batch(self, messages: list[Any]) -> None:
        """Fold a batch; table writes and snapshots are collected and made once per run."""
        dirty: dict[str, tuple[RunState, int]] = {}
        publish: dict[str, RunState] = {}
        self._pending = dirty
        for message in messages:
            EVENTS_PROCESSED.labels(PROCESSOR, message.topic).inc()
            key = (message.topic, message.partition)
            self.positions[key] = max(self.positions.get(key, 0), message.offset + 1)
            try:
                self._fold_one(message, dirty, publish)
            except Rejected as exc:
                self._dead_letter(message, exc.reason, exc.detail)
            except Exception as exc:  # one bad message must never stop the fold
                log.exception("state processor failed on an event")
                self._dead_letter(message, "processing-error", repr(exc))
        for state, partition in dirty.values():
            self.store.put(state, partition)
        self._pending = {}
        for state in publish.values():
            self._publish(state)
        self._gauges()

    def _fold_one(self, message: Any, dirty: dict[str, tuple[RunState, int]], publish: dict[str, RunState]) -> None:
        # Who wrote it first: an event of the core's own roles is decoded without validating it again.
        writer = None
        if self.authenticator is not None:
            writer = self.authenticator.verified_writer(message.value, getattr(message, "headers", None))
        event = self.decode(message, trusted=writer in TRUSTED_WRITERS)
        self.hops.observe(message.topic, event)
        if not isinstance(event, Event) or (message.topic == self.results_topic) != isinstance(event, ToolResult):
            raise Unprocessable("unexpected-event", f"{type(event).__name__} on {message.topic}")
        if self.authenticator is not None:
            self._authenticate(message, event, writer)
        # ``state`` reads this batch's own write first (a run that ended earlier in the batch has left the
        # cache and is not stored yet; folding onto the stored, older state would count its end twice).
        before = self.state(event.run_id)
        try:
            workflow = None  # an event of a run never requested: the fold refuses it
            if before is not None:
                workflow = self.workflow(before.snapshot.request.workflow)
            elif isinstance(event, RunRequested):
                workflow = self.workflow(event.workflow)
            outcome = apply(before, event, self.settings.run_deadline_s, workflow)
        except Rejected as exc:
            # A refused child request (dead-lettered by the caller) fails its parent's step now, as the
            # child's ending would have: the parent does not wait for its deadline (processors/state/children.py).
            refused = refusal_result(event, exc.reason, exc.detail) if isinstance(event, RunRequested) else None
            if refused is not None:
                self._emit(refused, self.results_topic)
            raise
        if isinstance(event, RunCompleted | RunFailed):
            # A child run's end answers its parent's step; again when the ending is redelivered (a crash
            # before this batch was acknowledged), and the parent takes it once (processors/state/children.py).
            answer = parent_result(outcome.state, event)
            if answer is not None:
                self._emit(answer, self.results_topic)
        if not outcome.changed:
            return
        after, wants = outcome.state, outcome.publish
        partition = message.partition
        if before is not None:
            still = {s.command_id for s in in_flight(after.snapshot)}
            for answered in in_flight(before.snapshot):
                if answered.command_id not in still:  # forget what the loss checks knew of it
                    self.suspects.pop(answered.command_id or "", None)
                    self.checks.pop(answered.command_id or "", None)
        snap = after.snapshot
        if before is None:
            RUNS.labels(RunStatus.running.value).inc()
            if not counted(snap):
                pass  # a child run: admitted at once, its parent's place covers it (see ``counted``)
            elif self.admission.has_room(partition):
                self.admission.admit(partition, snap.run_id)
            else:
                after, wants = after.model_copy(update={"admitted": False}), False
                self.admission.wait(partition, snap.run_id)
        elif not after.admitted:
            if snap.deadline_exceeded or snap.status.terminal or snap.cancelled is not None:
                # It waited past its deadline, or an operator cancelled it: let the decider end it now, out of turn.
                self.admission.withdraw(partition, snap.run_id)
                self.admission.admit(partition, snap.run_id)
                after = after.model_copy(update={"admitted": True})
            else:
                wants = False
        if isinstance(event, ToolResult) and before is not None:
            _observe_step(before.snapshot, event)
        if snap.status.terminal and (before is None or not before.snapshot.status.terminal):
            RUNS.labels(snap.status.value).inc()
            _observe_end(snap)
        self._store(after, partition, dirty)
        if wants:
            publish[snap.run_id] = after
        if after.admitted and not self._active(snap):
            self._finish(partition, snap.run_id, dirty, publish)
        else:
            self._schedule(partition, after)

    def _authenticate(self, message: Any, event: Event, writer: str | None = None) -> None:
        """Refuse (dead letter ``unauthenticated``, nothing changed) an event no pipeline component wrote."""
        assert self.authenticator is not None
        try:
            self.authenticator.verify(event, message.value, getattr(message, "headers", None), writer)
        except Unauthenticated as exc:
            detail = str(exc)
            if isinstance(event, RunRequested) and header_value(getattr(message, "headers", None)) is None:
                detail = (
                    f"a request produced straight onto the run log: upstream systems produce requests to"
                    f" {self.settings.topic(RUN_REQUESTS)} (the intake topic), which validates and signs them"
                )
            raise Unprocessable("unauthenticated", detail) from None
        home = self.partition(event.run_id)
        if message.partition != home:
            # Our own producers key by run id with the project's partitioner; a run's events elsewhere
            # would be folded out of order with the rest of its log.
            raise Unprocessable(
                "wrong-partition", f"{event.type} of run {event.run_id} on partition {message.partition}, not {home}"
            )

    def decode(self, message: Any, trusted: bool = False) -> Any:
        """The message's event (a replay, which decodes each record once for several readers, overrides it).
        ``trusted``: verified as written by a core role (``authn.TRUSTED_WRITERS``), so not validated again."""
        return codec.decode(message.value, self.settings.max_event_bytes, trusted=trusted)

    def _store(self, state: RunState, partition: int, dirty: dict[str, tuple[RunState, int]]) -> None:
        run_id = state.snapshot.run_id
        dirty[run_id] = (state, partition)
        self.cache[run_id] = state

    def _finish(
        self, partition: int, run_id: str, dirty: dict[str, tuple[RunState, int]], publish: dict[str, RunState]
    ) -> None:
        """A run is over: free its slot, forget its timers, and admit the oldest waiting run."""
        self.admission.finish(partition, run_id)
        self.queue.cancel(run_id, DEADLINE)
        self.queue.cancel(run_id, REDRIVE)
        self.queue.cancel(run_id, APPROVAL)
        if self.settings.state_retention_s > 0:
            self.queue.schedule(partition, run_id, RETAIN, time.time() + self.settings.state_retention_s)
        self.cache.pop(run_id, None)
        while (next_id := self.admission.next_waiting(partition)) is not None:
            waiting = self.state(next_id)
            if waiting is None:
                continue
            admitted = waiting.model_copy(update={"admitted": True})
            self.admission.admit(partition, next_id)
            self._store(admitted, partition, dirty)
            publish[next_id] = admitted
            self._schedule(partition, admitted)

    def _schedule(self, partition: int, state: RunState) -> None:
        snap = state.snapshot
        run_id = snap.run_id
        if snap.status is RunStatus.running and not snap.deadline_exceeded:
            self.queue.schedule(partition, run_id, DEADLINE, snap.deadline_at.timestamp())
        else:
            self.queue.cancel(run_id, DEADLINE)
        pending = [a.expires_at.timestamp() for a in snap.approvals if a.status is ApprovalStatus.requested]
        if pending and snap.status is RunStatus.running:
            self.queue.schedule(partition, run_id, APPROVAL, min(pending))
        else:
            self.queue.cancel(run_id, APPROVAL)
        # A running child run is not checked for loss: it answers when it ends, however long it takes.
        flights = loss_checked(snap, self.workflows.get(snap.request.workflow)) if state.admitted else []
        if flights:
            self.queue.schedule(partition, run_id, REDRIVE, min(self._check_at(step) for step in flights))
        else:
            self.queue.cancel(run_id, REDRIVE)

    def _check_at(self, step: StepState) -> float:
        """When to next look for evidence that this step's command is lost: ``redrive_check_s`` after
        dispatch, doubling with every re-send and every look that found it still queued."""
        looks = self.checks.get(step.command_id or "", 0)
        backoff = min(self.settings.redrive_check_s * 2 ** (step.redrives + looks), self.settings.redrive_check_max_s)
        since = step.dispatched_at.timestamp() if step.dispatched_at is not None and not looks else time.time()
        return since + backoff

    def _publish(self, state: RunState) -> None:
        snap = state.snapshot
        SNAPSHOTS.inc()
        value = codec.encode(snap)
        if self.keys is not None:
            value = sign_snapshot_bytes(value, self.keys)
        self.producer.produce(self.snapshots_topic, key=snap.run_id.encode(), value=value)

    def _dead_letter(self, message: Any, reason: str, error: str) -> None:
        self.dead_letters.send_raw(
            message.topic,
            message.partition,
            message.offset,
            message.key,
            message.value,
            reason,
            error,
            getattr(message, "headers", None),
        )

    def _gauges(self) -> None:
        RUNS_ADMITTED.set(self.admission.running)
        RUNS_WAITING.set(self.admission.queued)

    def report_due(self, now: float) -> bool:
        """Whether the periodic gauges (lag, oldest run) are due; every ``consumer_lag_interval_s``."""
        interval = self.settings.consumer_lag_interval_s
        if interval <= 0 or now - self._reported_at < interval:
            return False
        self._reported_at = now
        return True

    def report(self, highwaters: dict[tuple[str, int], int | None], now: float) -> None:
        """Lag of the partitions this worker folds (high watermark minus folded position: faust
        commits that position every half second), and the age of the oldest run in flight."""
        lags = {
            tp: end - self.positions[tp]
            for tp, end in highwaters.items()
            if end is not None and tp in self.positions and tp[0] in (self.events_topic, self.results_topic)
        }
        self._lag_shown = set_lag(self.settings.group(PROCESSOR), lags, self._lag_shown)
        oldest = min(
            (s.snapshot.created_at.timestamp() for s in self.cache.values() if s.snapshot.status is RunStatus.running),
            default=None,
        )
        RUN_OLDEST_SECONDS.set(0.0 if oldest is None else max(0.0, now - oldest))

    # -- the timer -------------------------------------------------------------------------------
    async def tick(self, now: float | None = None) -> None:
        """Deadlines and loss checks that are due; nothing else is looked at.

        Runs on the event loop like the fold; only the broker look-ups go to a thread.
        """
        moment = time.time() if now is None else now
        checks: list[tuple[int, RunState, StepState]] = []
        for partition, run_id, kind in self.queue.due(moment):
            state = self.state(run_id)
            if state is None:
                continue
            snap = state.snapshot
            if kind == RETAIN:
                if not self._active(snap):
                    self.store.delete(run_id, partition)
                continue
            if kind == DEADLINE:
                if snap.status is RunStatus.running and not snap.deadline_exceeded:
                    self._emit(
                        RunDeadlineExceeded(
                            event_id=stable_id(run_id, "deadline-exceeded"),
                            run_id=run_id,
                            causation_id=snap.last_event_id,
                            deadline_at=snap.deadline_at,
                        )
                    )
            elif kind == APPROVAL:
                # Nobody answered in time: say so in the run's log; the guard then escalates the run.
                for held in snap.approvals:
                    if held.status is ApprovalStatus.requested and held.expires_at.timestamp() <= moment:
                        self._emit(
                            ApprovalExpired(
                                event_id=stable_id(held.request_id, "expired"),
                                run_id=run_id,
                                causation_id=snap.last_event_id,
                                request_id=held.request_id,
                                step=held.step,
                            )
                        )
            elif state.admitted:
                for step in loss_checked(snap, self.workflows.get(snap.request.workflow)):
                    self._run_of[step.command_id or ""] = run_id
                    checks.append((partition, state, step))
        if checks:
            await self._check_lost(checks, moment)
            self._run_of.clear()
        await _blocking(self.producer.flush, 30)

    async def _check_lost(self, checks: list[tuple[int, RunState, StepState]], now: float) -> None:
        """Judge in-flight commands by their tool group's committed offset (one request per tool)."""
        by_tool: dict[str, list[tuple[int, RunState, StepState]]] = {}
        for item in checks:
            by_tool.setdefault(self._tool_of(item[1].snapshot, item[2]), []).append(item)
        judged: list[tuple[int, StepState, str, int]] = []
        for tool, items in by_tool.items():
            topic = self.settings.topic(command_topic(tool))
            wanted = sorted({(topic, s.command_partition) for _, _, s in items if s.command_partition is not None})
            try:
                committed = await _blocking(
                    group_offsets, self._admin_client(), self.settings.group(f"tool.{tool}"), wanted
                )
            except Exception as exc:  # the broker is busy or away: assume nothing, look again later
                log.warning("could not read the %s group's offsets: %r", tool, exc)
                committed = {}
            judged += [(p, st, topic, committed.get((topic, st.command_partition or 0), -1)) for p, _, st in items]
        probe: set[tuple[str, int]] = set()
        for partition, step, topic, done in judged:
            if (current := self._still_in_flight(step)) is not None:
                probe |= await self._judge(partition, current, topic, done, now)
            else:
                self.suspects.pop(step.command_id or "", None)
        if probe:
            ends = await _blocking(faust_compat.true_highwaters, self.settings, sorted(probe))
            for suspect in self.suspects.values():
                if suspect.highwater is None and (self.results_topic, suspect.partition) in ends:
                    suspect.highwater = ends[(self.results_topic, suspect.partition)]

    def _still_in_flight(self, step: StepState) -> tuple[RunState, StepState] | None:
        """The run and step as they stand now (the fold may have moved on while the broker answered)."""
        state = self.cache.get(self._run_of.get(step.command_id or "", ""))
        if state is None:
            return None
        for current in in_flight(state.snapshot):
            if current.command_id == step.command_id:
                return state, current
        return None

    async def _judge(
        self, partition: int, current: tuple[RunState, StepState], topic: str, done: int, now: float
    ) -> set[tuple[str, int]]:
        """One command's verdict; returns the results partitions whose end must be read for it."""
        state, step = current
        run_id, command_id = state.snapshot.run_id, step.command_id or ""
        if step.command_offset is None or done <= step.command_offset:
            # Still in its topic, or being worked on (a tool commits only after its result is
            # acknowledged): waiting, never lost. Look again later, less often. (A command without a
            # recorded offset gives no evidence either way, so it is never judged lost.)
            self.suspects.pop(command_id, None)
            self.checks[command_id] = self.checks.get(command_id, 0) + 1
            self.queue.schedule(partition, run_id, REDRIVE, self._check_at(step))
            return set()
        results = (self.results_topic, partition)
        suspect = self.suspects.get(command_id)
        self.queue.schedule(partition, run_id, REDRIVE, now + 1.0)
        if suspect is None:
            # The tool is past it, so its result, if it made one, was acknowledged before now. Most
            # such results are merely queued: look again in a second before asking the broker anything.
            self.suspects[command_id] = Suspect(partition)
            return set()
        if suspect.highwater is None:
            return {results}  # read the results partition's end once, for every suspect on it
        if await self._position(results) < suspect.highwater:
            return set()  # still folding up to it
        del self.suspects[command_id]
        self.queue.cancel(run_id, REDRIVE)
        redrive = step.redrives + 1
        give_up = step.redrives >= self.settings.redrive_max
        tool = self._tool_of(state.snapshot, step)
        evidence = (
            f"the {tool} tool's group committed {topic}[{step.command_partition}] up to {done}, past the"
            f" command at offset {step.command_offset}, and {self.results_topic}[{partition}] held no result"
            f" for it up to offset {suspect.highwater}"
        )
        REDRIVES.labels("given-up" if give_up else "re-sent").inc()
        log.warning(
            "command lost: %s",
            "giving up" if give_up else f"re-drive {redrive}",
            extra={"run_id": run_id, "step": step.name, "command_id": command_id, "evidence": evidence},
        )
        self._emit(
            CommandLost(
                event_id=stable_id(command_id, "lost", str(redrive)),
                run_id=run_id,
                causation_id=state.snapshot.last_event_id,
                command_id=command_id,
                step=step.name,
                tool=tool,
                redrive=redrive,
                give_up=give_up,
                evidence=evidence,
            )
        )
        return set()

    async def _position(self, tp: tuple[str, int]) -> int:
        """How far this processor has folded a partition (its committed offset if nothing came yet)."""
        if tp not in self.positions:
            done = await _blocking(group_offsets, self._admin_client(), self.settings.group(PROCESSOR), [tp])
            self.positions[tp] = max(0, done.get(tp, 0))
        return self.positions[tp]

    def _tool_of(self, snap: StateSnapshot, step: StepState) -> str:
        declared = self.workflow(snap.request.workflow).step(step.name)
        if step.status is StepStatus.compensating and declared.compensation is not None:
            return declared.compensation.tool
        return declared.tool

    def _admin_client(self) -> Any:
        if self._admin is None:
            self._admin = admin(self.settings)
        return self._admin

    def _emit(self, event: Event, topic: str | None = None) -> None:
        value = codec.encode(event)
        headers = self.signer.headers(value) if self.signer is not None else None
        self.producer.produce(topic or self.events_topic, key=event.run_id.encode(), value=value, headers=headers)


def counted(snap: StateSnapshot) -> bool:
    """Whether the run takes a place in the running-runs bound (``max_running_runs``): every run but a
    child run. A child's request carries a parent only when the decision processor signed it
    (streamagent.authn), and its parent holds a place until it ends, which is never before its live children
    are answered or ended: a child that waited for a place its parent's siblings hold would stall them all."""
    return snap.request.parent_run_id is None


def _observe_step(before: StateSnapshot, result: ToolResult) -> None:
    """``streamagent_step_seconds``: the step's command dispatched, its result now folded."""
    for step in before.steps:
        if step.command_id == result.command_id and step.dispatched_at is not None:
            seconds = (result.occurred_at - step.dispatched_at).total_seconds()
            STEP_SECONDS.labels(step.name, result.status.value).observe(max(0.0, seconds))
            return


def _observe_end(snap: StateSnapshot) -> None:
    RUN_SECONDS.labels(snap.status.value).observe(max(0.0, (snap.updated_at - snap.created_at).total_seconds()))
    tracing.run_ended(
        snap.run_id,
        snap.status.value,
        snap.created_at,
        snap.updated_at,
        {"streamagent.workflow": snap.request.workflow, "streamagent.run.reason": snap.reason or ""},
    )


async def _blocking(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Checkpoints:
    """Writes and reads the state table's checkpoints (see ``checkpoint``) for the owned partitions."""

    def __init__(self, settings: Settings, worker: StateWorker, store: FaustTableStore, changelog: str) -> None:
        self.settings = settings
        self.worker = worker
        self.store = store
        self.changelog = changelog
        self.topic = checkpoint_topic(settings)
        self.written: dict[int, int] = {}  # partition -> changelog offset of its last checkpoint
        self._at = time.time()
        self.data: CheckpointedStore | None = None
        self._created = False

    def table_store(self, app: faust.App, table: Any) -> CheckpointedStore:
        self.data = CheckpointedStore(
            "memory://",
            app,
            table,
            table_name=table.name,
            key_type=table.key_type,
            key_serializer=table.key_serializer,
            value_serializer=table.value_serializer,
            value_type=table.value_type,
            loop=table.loop,
            options=table.options,
        )
        self.data.partition_of = self.worker.partition
        self.data.written = self.store.written  # one dict: what this process wrote is what the store holds
        if self.settings.state_checkpoint_interval_s > 0:
            self.data.loader = self.load
        return self.data

    def _ensure_topic(self) -> None:
        """Created on first use (in a thread, once faust has started), like faust creates its changelog."""
        if not self._created:
            _create_topic(self.settings, self.topic)
            self._created = True

    def due(self, now: float) -> bool:
        interval = self.settings.state_checkpoint_interval_s
        if interval <= 0 or now - self._at < interval:
            return False
        self._at = now
        return True

    def write(self) -> int:
        """One record per owned partition whose changelog moved since its last checkpoint; returns how many."""
        assert self.data is not None
        self._ensure_topic()
        owned = self.worker.assigned or frozenset()
        # The offsets first, then the runs: every record up to an offset was put before it was acked.
        none = (-1, "")
        covers = {p: max(self.store.written.get(p, none), self.data.applied.get(p, none)) for p in owned}
        runs: dict[int, dict[str, bytes]] = {p: {} for p in owned}
        for key, value in list(self.data.data.items()):
            p = self.worker.partition(key)
            if p in runs and value is not None:
                runs[p][key] = value
        count = 0
        for p, (offset, ends_on) in covers.items():
            if offset < 0 or self.written.get(p) == offset:
                continue
            value = encode_checkpoint(offset, ends_on, runs[p])
            if len(value) > CHECKPOINT_MAX_BYTES:
                # Too big for one record (many runs within retention): skipped, never fatal. Recovery then
                # reads the changelog from this partition's previous checkpoint, or whole.
                log.warning(
                    "state checkpoint of partition %d not written: %d bytes (%d runs), over %d",
                    p,
                    len(value),
                    len(runs[p]),
                    CHECKPOINT_MAX_BYTES,
                )
                continue
            self.worker.producer.produce(self.topic, key=str(p).encode(), value=value, partition=p)
            self.written[p] = offset
            count += 1
        if count:
            self.worker.producer.flush(30)
            log.debug("state checkpoints written", extra={"partitions": count})
        return count

    def load(self, partitions: list[int]) -> dict[int, tuple[int, str, dict[str, bytes]]]:
        """The last checkpoint of each partition that still fits its changelog: the record it ends on is
        still there. (A broker that lost its data, or a changelog deleted and rewritten by ``replay
        --apply``, has another record there or none: that checkpoint is ignored, the changelog read whole.)"""
        self._ensure_topic()
        found = {
            p: decode_checkpoint(value)
            for p, value in last_records(self.settings, self.topic, partitions).items()
            if value is not None
        }
        there = records_at(self.settings, self.changelog, {p: offset for p, (offset, _, _) in found.items()})
        out: dict[int, tuple[int, str, dict[str, bytes]]] = {}
        for p, (offset, ends_on, runs) in found.items():
            if there.get(p) == ends_on:
                out[p] = (offset, ends_on, runs)
                self.written[p] = offset
            else:
                log.warning("state checkpoint of partition %d does not match its changelog: ignored", p)
        return out


def _create_topic(settings: Settings, topic: str) -> None:
    from confluent_kafka.admin import NewTopic

    client = admin(settings)
    if topic in client.list_topics(timeout=10).topics:
        return
    spec = NewTopic(
        topic,
        num_partitions=settings.partitions,
        replication_factor=settings.replication_factor,
        # As large as a checkpoint may be (Apache Kafka's default is 1 MB).
        config={"cleanup.policy": "compact", "max.message.bytes": str(CHECKPOINT_MAX_BYTES + 64 * 1024)},
    )
    for future in client.create_topics([spec], operation_timeout=10).values():
        try:
            future.result()
        except Exception as exc:  # created meanwhile by another member
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def build_app(settings: Settings) -> faust.App:
    faust_compat.apply(settings)
    brokers = ";".join(f"kafka://{s.strip()}" for s in settings.bootstrap_servers.split(","))
    app = faust.App(
        settings.group(PROCESSOR),
        broker=brokers,
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_credentials=faust_compat.broker_credentials(settings),
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.state_session_ms / 1000,
        broker_heartbeat_interval=settings.state_heartbeat_ms / 1000,
        broker_commit_interval=0.5,
        producer_linger=settings.linger_ms / 1000,
        producer_max_request_size=16 * 1024 * 1024,
        consumer_max_fetch_size=16 * 1024 * 1024,
        stream_buffer_maxsize=max(4096, settings.batch_size * 4),
        datadir=str(settings.data_dir / "faust"),
        # No static membership for the state group: on the embedded broker two faust members with
        # instance ids rebalanced every ~7 s for as long as they ran (5 assignments each in 60 s; without
        # ids, one), and a restart under the same id still waited the full join and sync (measured
        # 2026-12-07, docs/operations/state-recovery.md). STREAMAGENT_GROUP_INSTANCE_ID is not used here.
        consumer_group_instance_id=None,
        # No standby replicas: a standby re-reads the whole changelog of each partition it is newly given at
        # every rebalance, and then every record written there (13,000 records a member at one join in
        # ``bench/scale.py``, 2026-12-07), for a warm copy that only a kill -9 would use. A partition that
        # moves on a rebalance or a graceful stop is handed off in a checkpoint instead (``hand_off``); after
        # a kill its next owner loads the last periodic checkpoint and the changelog since.
        table_standby_replicas=0,
        key_serializer="json",
        value_serializer="json",
    )
    events = app.topic(
        settings.topic(RUN_EVENTS),
        settings.topic(TOOL_RESULTS),
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    # Written through ``FaustTableStore`` (changelog to the run's own partition, per batch); faust
    # recovers it. ``use_partitioner`` only spares faust a lookup of the current event it never needs.
    table = app.Table(
        "runs", default=None, partitions=settings.partitions, key_type=str, value_type=bytes, use_partitioner=True
    )
    producer = make_producer(settings)
    changelog = table.changelog_topic.get_topic_name()
    store = FaustTableStore(table, producer, changelog)
    worker = StateWorker(settings, store, producer, keys=load_keys(settings))
    events_topic = settings.topic(RUN_EVENTS)
    fold_topics = {events_topic, settings.topic(TOOL_RESULTS)}
    members = MemberAnnouncer(settings, producer, PROCESSOR)  # `streamagent status`: partitions, lag, work
    checkpoints = Checkpoints(settings, worker, store, changelog)
    table._data = checkpoints.table_store(app, table)

    async def hand_off(why: str) -> None:
        """Checkpoint every owned partition whose changelog moved, before it may move to another member:
        its next owner then loads the runs from one record instead of reading the changelog since the
        last periodic checkpoint (or whole, for a partition this member held for less than an interval:
        4,400 records a partition at a leave in ``bench/scale.py``, 2026-12-07). Never fatal: the next
        owner reads the changelog, as without it."""
        if settings.state_checkpoint_interval_s <= 0 or not worker.assigned:
            return
        try:
            started = time.monotonic()
            count = await _blocking(checkpoints.write)
            log.info("state handed off (%s): %d checkpoint(s) in %.2fs", why, count, time.monotonic() - started)
        except Exception as exc:
            log.warning("state checkpoints not written at %s: %r", why, exc)

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: Any, **kwargs: Any) -> None:
        # Faust has drained the streams and flushed by now: what the table holds is what was folded.
        await hand_off("rebalance")
        # Drop every per-partition memory before the partitions move; ``sync`` rebuilds it from the
        # table once recovery of the new assignment completes. A revoke is also where faust would
        # commit: our batches are settled (flushed) before they are acked, so nothing is pending.
        worker.release()
        offsets.forget()

    @app.on_before_shutdown.connect
    async def on_shutdown(app: faust.App, **kwargs: Any) -> None:
        # A graceful stop (SIGTERM): the streams are drained and the member has not left the group yet,
        # so the checkpoint is on the broker before the survivors are assigned its partitions.
        await hand_off("shutdown")

    async def settle() -> None:
        """Everything this batch caused is acknowledged before faust may commit its offsets."""
        remaining = await _blocking(worker.producer.flush, 30)
        if remaining:
            raise RuntimeError(f"{remaining} snapshot(s) not acknowledged; not acking the batch")
        await app.producer.flush()  # anything faust itself sent

    def sync() -> None:
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            return
        assigned = frozenset(tp.partition for tp in app.consumer.assignment() if tp.topic == events_topic)
        if assigned == worker.assigned:
            return
        worker.sync_assignment(assigned)
        data = checkpoints.data
        if data is not None:
            # In the message itself: faust's log format drops extras. Tests read it (recovery is bounded).
            log.info(
                "state recovered: %d run(s) from checkpoints, %d changelog record(s) read",
                data.loaded_runs,
                data.recovered_records,
            )
            data.loaded_runs = data.recovered_records = 0

    # The fold's own account of its offsets, which the group commits (processors/state/offsets.py).
    offsets = FoldOffsets(worker.positions)
    faust_compat.commit_from(app, offsets.commit_offset)

    def start_of(tp: tuple[str, int]) -> int | None:
        """Where the fold resumes a partition it has not folded since its assignment: the group's commit
        (where faust seeked), or further if this member settled more of it before a rebalance kept it here."""
        committed = app.consumer._committed_offset.get(tp)
        settled = offsets.settled.get(tp)
        known = [o for o in (committed, settled) if o is not None]
        return max(known) if known else None

    async def fold_in_order(messages: list[Any]) -> None:
        """Fold the messages in offset order, first reading from the broker any records faust skipped."""
        try:
            holes = offsets.holes(messages, start_of)
            if holes:
                filled = await _blocking(read_range, settings, holes)
                SKIPPED_RECORDS.inc(len(filled))
                log.warning(
                    "faust skipped %d record(s); folding them from the broker: %s",
                    len(filled),
                    ", ".join(f"{t}[{p}] {a}..{b - 1}" for (t, p), (a, b) in sorted(holes.items())),
                )
                # Each partition's skipped records, then the delivered ones: offset order per partition.
                # Sorting by topic first also folds a batch's run events before its tool results
                # ("agent.run.events" < "agent.tool.results"): a result filled from the broker must not
                # be folded before the command event it answers, or replay (which reads events first)
                # and the live fold would disagree about the run. Keep this order.
                messages = sorted([*filled, *messages], key=lambda m: (m.topic, m.partition, m.offset))
            taken = offsets.take(messages, start_of)
        except (Skipped, TimeoutError, KafkaException) as exc:
            # The skipped records could not be read (the broker is slow), or a rebalance moved the
            # partition meanwhile: nothing of this batch is folded, so nothing of it is committed, and
            # the next record delivered (or the stalled-tail check) finds the hole again.
            log.warning("a batch was not folded; its records will be read again: %s", exc)
            return
        worker.fold_batch(taken)
        folded = dict(offsets.folded)  # what this batch brings; folds that start meanwhile settle on their own
        members.processed += len(taken)
        await settle()
        offsets.settle(folded)

    @app.agent(events)
    async def fold(stream: Any) -> None:
        # Gather for up to one fetch wait: under load that joins several fetches into one batch (one
        # flush, one changelog write per run); a lone event waits at most that long (measured: a 5 ms
        # window cost ~20% more CPU per run at 1,000 runs).
        async for batch in stream.take_events(settings.batch_size, within=settings.fetch_wait_ms / 1000):
            sync()
            await fold_in_order([event.message for event in batch])

    async def fold_stalled_tails() -> None:
        """Records faust skipped at the end of a partition have no later record to reveal them: a
        partition whose end lies beyond the fold, with nothing delivered for a while, is read here."""
        ends = {
            (tp.topic, tp.partition): end
            for tp in app.consumer.assignment()
            if tp.topic in fold_topics and (end := app.consumer.highwater(tp)) is not None
        }
        stalled = offsets.stalled(ends, STALL_S)
        if not stalled:
            return
        try:
            filled = await _blocking(read_range, settings, stalled)
        except (TimeoutError, KafkaException) as exc:  # the broker is slow: the next tick looks again
            log.warning("stalled partition ends not read: %s", exc)
            return
        if filled:
            SKIPPED_RECORDS.inc(len(filled))
            log.warning("faust delivered nothing of %d record(s) at partition ends; folding them", len(filled))
            await fold_in_order(sorted(filled, key=lambda m: (m.topic, m.partition, m.offset)))

    @app.timer(interval=0.5)
    async def watch() -> None:
        sync()
        if members.due() and not app.rebalancing:
            members.announce(faust_partitions(app.consumer, [events_topic, settings.topic(TOOL_RESULTS)]))
        if worker.assigned is None or app.rebalancing or not app.tables.recovery.completed.is_set():
            return  # between a revoke and the end of recovery: this member owns nothing to act on
        if worker.report_due(time.time()):
            try:  # a gauge is never worth failing the timer: it tries again at the next interval
                ends = {(tp.topic, tp.partition): app.consumer.highwater(tp) for tp in app.consumer.assignment()}
                worker.report(ends, time.time())
            except Exception as exc:
                log.debug("lag not reported: %r", exc)
        await worker.tick()
        await fold_stalled_tails()
        if checkpoints.due(time.time()):
            try:  # a checkpoint only shortens a later recovery: never worth stopping the timer for
                await _blocking(checkpoints.write)
            except Exception as exc:
                log.warning("state checkpoints not written: %r", exc)

    app.worker_state = worker  # type: ignore[attr-defined]
    return app


def run(settings: Settings) -> None:
    from faust import Worker

    class _Worker(Worker):
        # faust renames the process ("[Faust:Worker] -init- …") once setproctitle is installed; the stack,
        # ps and the tests know a process by the command line it was started with, so keep that.
        def _setproctitle(self, info: str, **_: object) -> None:
            pass

    app = build_app(settings)
    worker = _Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
