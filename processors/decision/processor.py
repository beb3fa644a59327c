"""The decision processor: one snapshot in, at most one recorded decision and its follow-up out.

Invariant: one decision per (run, state version). The decision and its follow-up event (a tool
command or the run's end) are written to PostgreSQL before they are produced, so a redelivered
snapshot re-emits exactly the recorded bytes and never asks the decider again. A snapshot older
than one already seen for the run is superseded: nothing is decided on stale state.

Waiting runs. A run decided ``wait`` ("waiting for tool X") gets no new snapshot by itself: the
state processor publishes none for a recorded wait. So the wait is recorded durably: the statement
that stores the wait also writes a ``decision_waits`` row (run, tool X, the snapshot it waited on at
version v, and that snapshot's partition on the state topic), and the statement that stores the run's
next decision, whatever it is, deletes that row. A row is therefore the proof that the run's latest
decision is still the wait at v, on any instance and after any restart.

Once the catalogue shows X available, the processor reads X's rows of the partitions it owns, oldest
first, at most ``wake_batch`` per tick, and decides each run again on the state it has after its
wait: snapshot v with version v+1 and the wait as its last decision, which is exactly what folding the
recorded wait makes of it (only the version, the last event and the shown reason move). One decision
per (run, state version) still holds: the wait stays the decision of v, the new one is the decision
of v+1, stored and emitted like any other, and storing it deletes the row. A run decided anything
since its wait has no row and is not woken.

Memory holds no snapshot of a waiting run, only which tools some run of the owned partitions may wait
for (rebuilt from the table when the partition assignment changes, added to when a wait is stored or
replayed), so 100,000 runs waiting for a missing tool cost table rows, not memory, and a tool that
appears wakes them a page per tick between batches instead of in one stalling pass.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from confluent_kafka import Producer
from streamagent.processors.decision.arguments import ArgumentCheck, no_check
from streamagent.processors.decision.child import child_endings, child_request
from streamagent.processors.decision.choice import ChosenDecider, EntryOf
from streamagent.processors.decision.decider import Decider, Decision
from streamagent.processors.decision.gating import catalogue_inputs, decide
from streamagent.processors.decision.llm.budget import Caps
from streamagent.processors.decision.memory_watch import MemoryWatch
from streamagent.processors.decision.memory_writes import MemoryWriter
from streamagent.processors.decision.model_budget import Left, left
from streamagent.processors.decision.schema import SCHEMA
from streamagent.processors.decision.woken import after_wait
from streamagent.processors.guard.judge import Verdict
from streamagent.processors.guard.stage import GuardStage
from streamagent.processors.workflow import ToolAvailability, every_tool_available, load_workflows

from streamagent import codec, db, tracing
from streamagent.approval import load_approval_keys
from streamagent.authn import DECISION, Authenticator, issue, tool_keys
from streamagent.catalogue import Catalogue
from streamagent.config import Settings, SettingsError, env_name
from streamagent.dlq import DeadLetterSink
from streamagent.errors import DependencyUnavailable, Rejected
from streamagent.events import (
    ApprovalRequested,
    CommandResent,
    DecisionAction,
    DecisionRecorded,
    Event,
    FailureStatus,
    ParallelDispatch,
    RunCompleted,
    RunFailed,
    RunRequested,
    StateSnapshot,
    ToolCommand,
    command_id,
    is_cancel,
    is_child_tool,
    now,
    stable_id,
)
from streamagent.memory import MemoryReader, MemoryTable, no_memory
from streamagent.metrics import DECISIONS, RESENT_COMMANDS, decision_recorded
from streamagent.policy import load_policy
from streamagent.runtime import Batch, ConsumerRuntime, Incoming, Unprocessable
from streamagent.signing import CommandKeys, load_keys, sign, verify, verify_snapshot_bytes
from streamagent.topics import MEMORY_WRITES, RUN_EVENTS, RUN_STATE, command_topic

log = logging.getLogger(__name__)
PROCESSOR = "decision"


def follow_up(
    settings: Settings,
    snap: StateSnapshot,
    decision: Decision,
    decision_id: str,
    keys: CommandKeys,
    verdict: Verdict | None = None,
    guard: GuardStage | None = None,
    budget: Left | None = None,
) -> tuple[str | None, Event | None]:
    """The event a decision sends into the world, and the topic it goes to (none for a plain wait).

    A command is signed here, before it is stored: the stored bytes are what is produced, and what a
    re-drive re-sends, so every copy of it verifies at its tool. An approved command also carries its
    approval token, valid until the command's deadline; a step held for approval asks for it."""
    if decision.action is DecisionAction.wait:
        if verdict is None or verdict.ask is None:
            return None, None
        ask = verdict.ask
        request = ApprovalRequested(
            event_id=stable_id(ask.request_id, "requested"),
            run_id=snap.run_id,
            occurred_at=ask.requested_at,  # the guard's moment: the expiry is counted from it
            causation_id=decision_id,
            request_id=ask.request_id,
            decision_id=decision_id,
            step=ask.step,
            tool=ask.tool,
            arguments=ask.arguments,
            arguments_digest=ask.digest,
            reason=ask.reason,
            policy_version=verdict.policy_version,
            expires_at=ask.expires_at,
        )
        return settings.topic(RUN_EVENTS), request
    if decision.action in (DecisionAction.dispatch, DecisionAction.compensate):
        return dispatch_step(settings, snap, decision, decision_id, keys, verdict, guard, budget)
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
    if status is FailureStatus.failed and is_cancel(snap, decision.reason):
        status = FailureStatus.cancelled
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


def dispatch_step(
    settings: Settings,
    snap: StateSnapshot,
    decision: Decision,
    decision_id: str,
    keys: CommandKeys,
    verdict: Verdict | None = None,
    guard: GuardStage | None = None,
    budget: Left | None = None,
) -> tuple[str, ToolCommand | RunRequested]:
    """How one step of a decision is started, the one place that knows it: a signed command to the step's
    tool (each step of a fan-out comes through here), or, for a step that names a workflow, the child
    run's request on the run log (processors/decision/child.py; signed as this processor when produced)."""
    assert decision.step is not None and decision.tool is not None
    operation = "compensate" if decision.action is DecisionAction.compensate else "execute"
    if operation == "execute" and is_child_tool(decision.tool):
        request = child_request(settings, snap, decision.step, decision.tool, decision.arguments, decision_id)
        return settings.topic(RUN_EVENTS), request
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
        memory=decision.memory,
        # What the run may still spend on models (processors/decision/model_budget.py); signed below.
        budget_tokens=budget.tokens if budget is not None else None,
        budget_cost_usd=budget.cost_usd if budget is not None else None,
    )
    if verdict is not None and verdict.approved and guard is not None:
        command = command.model_copy(update={"approval": guard.token(snap, decision, deadline)})
    # Under the tool's own key (streamagent.authn): the tool holds that key only, not the pipeline's.
    return settings.topic(command_topic(decision.tool)), sign(command, tool_keys(keys, decision.tool))


@dataclass
class Emission:
    """A decision on its way out: its record, and the follow-up it causes (a command or the run's end)."""

    record: DecisionRecorded
    topic: str | None
    follow_up: bytes | None
    is_command: bool
    encoded: bytes = b""  # the record as stored (without where its command landed)
    # A fan-out's further commands (topic, signed bytes), in the order of ``record.parallel``.
    more: tuple[tuple[str, bytes], ...] = ()

    def only(self, command: str) -> Emission | None:
        """This emission narrowed to one of its commands (the one a re-drive re-sends), or None."""
        if command == self.record.command_id:
            return replace(self, more=())
        for dispatch, (topic, value) in zip(self.record.parallel, self.more, strict=False):
            if dispatch.command_id == command:
                update = {"step": dispatch.step, "tool": dispatch.tool, "command_id": command, "parallel": []}
                return replace(
                    self, record=self.record.model_copy(update=update), topic=topic, follow_up=value, more=()
                )
        return None


@dataclass
class RunMemory:
    """What the decision layer last did for a run: enough to answer the next snapshot without a query."""

    version: int  # the state version of the latest recorded decision (0: none yet)
    decision_id: str | None = None
    emission: Emission | None = None


def _emission(decision: bytes, topic: str | None, follow: bytes | None, more: Any = None) -> Emission:
    record = codec.decode(bytes(decision))
    assert isinstance(record, DecisionRecorded)
    is_command = record.action in (DecisionAction.dispatch, DecisionAction.compensate)
    further = tuple((t, bytes.fromhex(v)) for t, v in more or ())
    return Emission(record, topic, bytes(follow) if follow is not None else None, is_command, bytes(decision), further)


def _more_column(emission: Emission) -> str | None:
    """A fan-out's further commands as stored (jsonb: [[topic, hex bytes], ...]); None for one command."""
    return json.dumps([[topic, value.hex()] for topic, value in emission.more]) if emission.more else None


class DecisionHandler:
    """Decides a batch of snapshots with at most one database round trip in the steady state.

    Per batch: decide every snapshot from memory (one query first only for runs this process has
    not seen, e.g. after a restart), store all new decisions in one statement, produce their
    commands, and once those are acknowledged produce each DecisionRecorded carrying where its
    command landed (the state processor's evidence for re-drives), then the run endings.

    A batch that fails before its decisions are stored (PostgreSQL down) leaves no trace in memory:
    the runtime retries it whole, and it is decided again as if for the first time.
    """

    def __init__(
        self,
        settings: Settings,
        decider: Decider,
        producer: Producer,
        *,
        memory_size: int = 100_000,
        available: ToolAvailability | None = None,
        keys: CommandKeys | None = None,
        guard: GuardStage | None = None,
        snapshot_keys: CommandKeys | None = None,
    ) -> None:
        self.settings = settings
        # Policy outside the decider: every decision is judged before it is stored (processors/guard).
        self.guard = guard if guard is not None else GuardStage(settings)
        # The state processor's key: a snapshot that does not verify names no run the pipeline knows.
        # None (a handler built by hand, in unit tests): snapshots are not checked.
        self.snapshot_keys = snapshot_keys
        # Read once, at start: no key refuses the start (CommandKeyError) instead of failing per command.
        self.keys = keys if keys is not None else load_keys(settings)
        # What it writes to the run log is signed as the decision processor's (streamagent.authn).
        self.signer = issue(self.keys, DECISION)
        self.decider = decider
        self.producer = producer
        self.db = db.Reconnecting(settings.database_url)
        self.memory: OrderedDict[str, RunMemory] = OrderedDict()
        self.memory_size = memory_size
        self.round_trips = 0  # database round trips, for tests and the benchmark
        # What this batch changed in memory before its decisions were stored: undone if it fails.
        self._undo: dict[str, RunMemory | None] = {}
        self.available: ToolAvailability = available or getattr(decider, "available", every_tool_available)
        # The tools some run of the owned partitions may wait for: the index of ``decision_waits``
        # (the runs and their snapshots stay in the table, read a page at a time when the tool is there).
        self.waiting: set[str] = set()
        # The state topic's partitions this instance owns; None: not driven by a consumer (tests), all.
        self.owned: frozenset[int] | None = None
        self._wake_not_before = 0.0
        # Runs decided at once per batch: 1 for the rules (microseconds each), more for a model.
        self.concurrency = max(1, int(getattr(decider, "concurrency", 1)))
        self.recall_first = bool(getattr(decider, "costly", False))
        self._lock = threading.Lock()
        # Sends the memory writes of succeeded steps (None: the workflows write nothing, or a test).
        self.memory_writer: MemoryWriter | None = None

    @property
    def conn(self) -> Any:
        return self.db.conn

    def __call__(self, batch: Batch) -> None:
        self._undo = {}
        try:
            self._decide(batch)
        except BaseException:
            self._forget_unstored()
            raise

    def _forget_unstored(self) -> None:
        """Undo the memory of decisions that were not stored: otherwise a retried batch would emit a
        decision from memory (and its command) that no table holds, so a restart could not re-send it."""
        for run_id, previous in self._undo.items():
            if previous is None:
                self.memory.pop(run_id, None)
            else:
                self.memory[run_id] = previous
        self._undo = {}

    def _decide(self, batch: Batch) -> None:
        snaps: list[tuple[Incoming, StateSnapshot]] = []
        for item in batch:
            if isinstance(item.event, StateSnapshot):
                snaps.append((item, item.event))
            else:
                batch.reject(item, "unexpected-event", f"{type(item.event).__name__} on the snapshot topic")
        self._recall([snap for _, snap in snaps])
        emissions: list[Emission] = []
        new: list[tuple[StateSnapshot, Emission, int]] = []
        resends: list[tuple[StateSnapshot, Emission]] = []
        by_run: dict[str, list[tuple[Incoming, StateSnapshot]]] = {}  # each run's snapshots, in order
        for item, snap in snaps:
            by_run.setdefault(snap.run_id, []).append((item, snap))
        runs = list(by_run.values())
        workers = min(self.concurrency, len(runs))
        if workers <= 1:
            self._run(snaps, batch, emissions, new, resends)  # in the batch's order
        else:
            # A model takes seconds per decision: the batch's runs are decided at once, each run's
            # snapshots in order on one thread. Emissions of different runs interleave; that is fine,
            # as each run's events stay in order on its own partition.
            with ThreadPoolExecutor(workers, thread_name_prefix="decide") as pool:
                for done in [pool.submit(self._run, run, batch, emissions, new, resends) for run in runs]:
                    done.result()  # a failure (PostgreSQL down) fails the batch, as it does sequentially
        emissions += self._store(new)
        self._undo = {}  # stored: memory and table agree from here on
        self._emit(emissions, resends)
        if self.memory_writer is not None:  # what succeeded steps tell shared memory (verified snapshots only)
            shown = [item.event for item in batch if isinstance(item.event, StateSnapshot)]
            self.memory_writer.after(self.conn, shown)

    # -- per snapshot ----------------------------------------------------------------------------
    def _run(
        self,
        run: list[tuple[Incoming, StateSnapshot]],
        batch: Batch,
        emissions: list[Emission],
        new: list[tuple[StateSnapshot, Emission, int]],
        resends: list[tuple[StateSnapshot, Emission]],
    ) -> None:
        """Snapshots of a batch, in order (one run's, or the whole batch's when deciding sequentially)."""
        for item, snap in run:
            try:
                if self.snapshot_keys is not None:
                    # Only snapshots off the topic: a woken run's snapshot is this processor's own.
                    problem = verify_snapshot_bytes(item.message.value() or b"", snap.signature, self.snapshot_keys)
                    if problem is not None:
                        raise Unprocessable(
                            "unauthenticated", f"snapshot of run {snap.run_id} is not the state processor's: {problem}"
                        )
                # The snapshot's partition on the state topic (runs are keyed by run id): where its wait,
                # if it waits, is filed, so that the partition's owner is the one to wake it.
                self._one(snap, item.message.partition(), emissions, new, resends)
            except Rejected as exc:
                with self._lock:
                    batch.reject(item, exc.reason, exc.detail)

    def _one(
        self,
        snap: StateSnapshot,
        partition: int,
        emissions: list[Emission],
        new: list[tuple[StateSnapshot, Emission, int]],
        resends: list[tuple[StateSnapshot, Emission]],
    ) -> None:
        # The decider is asked outside the lock: a model call takes seconds, and runs of one batch
        # may be decided in parallel (see _decide); everything the handler shares is under it.
        with self._lock:
            memory = self._admit(snap, emissions, resends)
        if memory is None:
            return
        with tracing.span("decision", snap.run_id, {"streamagent.snapshot.version": snap.version}) as span:
            proposal, verdict = decide(self.decider, self.guard, snap)
            tracing.decided(span, proposal)
            tracing.annotate(span, {"streamagent.guard.outcome": verdict.outcome if verdict is not None else None})
        with self._lock:
            self._record(snap, partition, memory, verdict, new)

    def _admit(
        self, snap: StateSnapshot, emissions: list[Emission], resends: list[tuple[StateSnapshot, Emission]]
    ) -> RunMemory | None:
        """The run's memory when ``snap`` needs a decision; None when it is answered (or ignored) without one."""
        memory = self.memory.get(snap.run_id)
        if memory is None:
            if snap.version > 1:
                # Snapshots of a run start at version 1 and arrive in order on one partition, so a
                # later version of a run with no recorded decision did not come from the state processor.
                raise Unprocessable("unknown-run", f"snapshot v{snap.version} of run {snap.run_id} never seen before")
            self._undo.setdefault(snap.run_id, None)
            memory = self._remember(snap.run_id, RunMemory(version=0))
        if snap.redrive_command_id is not None:
            self._resend(snap, memory, resends)
            return None
        if snap.version == memory.version and memory.emission is not None:
            DECISIONS.labels(self.decider.name, "replayed").inc()
            emissions.append(memory.emission)
            self._note_wait(memory.emission.record)
            return None
        if snap.version < memory.version:
            recorded = self._recorded(snap)
            if recorded is not None:
                DECISIONS.labels(self.decider.name, "replayed").inc()
                emissions.append(recorded)
            else:
                DECISIONS.labels(self.decider.name, "superseded").inc()
                log.info("snapshot superseded", extra={"run_id": snap.run_id, "version": snap.version})
            return None
        if memory.decision_id is not None and memory.decision_id != snap.last_decision_id:
            # One decision in flight per run: the state has not taken the last one in yet, so this
            # snapshot cannot show its effect, and deciding now would decide the same thing again.
            DECISIONS.labels(self.decider.name, "waiting").inc()
            return None
        return memory

    def _model_budget(self, snap: StateSnapshot, decision: Decision) -> Left | None:
        """What the run may still spend on models, for the commands of ``decision``; None: nothing sent."""
        if decision.action not in (DecisionAction.dispatch, DecisionAction.compensate):
            return None
        workflows = getattr(self.decider, "workflows", None) or {}
        workflow = workflows.get(snap.request.workflow)
        caps = Caps.of(workflow, self.settings) if workflow is not None else Caps()
        return left(snap, decision, caps, self.guard.policies.current().budgets_for(snap.request.workflow))

    def _record(
        self,
        snap: StateSnapshot,
        partition: int,
        memory: RunMemory,
        verdict: Verdict | None,
        new: list[tuple[StateSnapshot, Emission, int]],
    ) -> None:
        if verdict is None:
            DECISIONS.labels(self.decider.name, "waiting").inc()
            return
        decision = verdict.decision
        decision_id = stable_id(snap.run_id, "decision", str(snap.version))
        budget = self._model_budget(snap, decision)
        topic, event = follow_up(self.settings, snap, decision, decision_id, self.keys, verdict, self.guard, budget)
        more: list[tuple[str, bytes]] = []
        parallel: list[ParallelDispatch] = []
        for further, judged in zip(decision.parallel, verdict.parallel, strict=True):
            at, command = dispatch_step(
                self.settings, snap, further, decision_id, self.keys, judged, self.guard, budget
            )
            more.append((at, codec.encode(command)))
            parallel.append(
                ParallelDispatch(
                    step=further.step or "",
                    tool=further.tool or "",
                    command_id=_command_of(command) or "",
                    arguments=further.arguments,
                    memory=further.memory,
                )
            )
        if isinstance(event, RunFailed):
            # A parent that ends ends its live children with it (sent with the ending, from the record).
            workflows = getattr(self.decider, "workflows", None) or {}
            ends = child_endings(snap, workflows.get(snap.request.workflow), decision_id, event.status, event.reason)
            more += [(self.settings.topic(RUN_EVENTS), codec.encode(end)) for end in ends]
        record = DecisionRecorded(
            event_id=decision_id,
            run_id=snap.run_id,
            causation_id=snap.last_event_id,
            decision_id=decision_id,
            based_on_version=snap.version,
            action=decision.action,
            step=decision.step,
            tool=decision.tool,
            command_id=_command_of(event),
            arguments=decision.arguments,
            reason=decision.reason,
            decider=decision.decider or self.decider.name,
            context=decision.context,
            prompt_tokens=decision.prompt_tokens,
            completion_tokens=decision.completion_tokens,
            cost_usd=decision.cost_usd,
            guard_outcome=verdict.outcome,
            guard_reason=verdict.reason,
            policy_version=verdict.policy_version,
            memory=decision.memory,
            parallel=parallel,
        )
        encoded = codec.encode(event) if event is not None else None
        emission = Emission(record, topic, encoded, isinstance(event, ToolCommand | RunRequested), more=tuple(more))
        new.append((snap, emission, partition))
        if snap.run_id not in self._undo:
            self._undo[snap.run_id] = RunMemory(memory.version, memory.decision_id, memory.emission)
        memory.version, memory.decision_id, memory.emission = snap.version, decision_id, emission
        self._note_wait(record)
        log.debug(
            "decided %s %s",
            decision.action.value,
            decision.step or "",
            extra={"run_id": snap.run_id, "version": snap.version, "decision_id": decision_id},
        )

    def _note_wait(self, record: DecisionRecorded) -> None:
        """A wait seen (decided, or replayed): its tool goes into the index; the run is in the table."""
        if record.action is DecisionAction.wait and record.tool is not None:
            self.waiting.add(record.tool)

    def revoked(self, _partitions: set[tuple[str, int]]) -> None:
        """Partitions were taken away (a rebalance): forget what was decided for every run, and the wait
        index. Memory is keyed by run, not partition, so all of it goes; the runs still owned are
        recalled from the table with their next snapshot (one query per batch), and the next tick
        rebuilds the wait index for the partitions owned then. A run that comes back to this member
        later is thus never answered from memory older than another member's decisions."""
        self.memory.clear()
        self._undo = {}
        # Owning nothing until the tick reads what is owned now: nothing is woken for a partition that left.
        self.owned, self.waiting = frozenset(), set()

    # -- waking waiting runs ---------------------------------------------------------------------
    def assign(self, partitions: frozenset[int]) -> None:
        """The state topic's partitions this instance owns now; on a change, the index of waited-for
        tools is rebuilt from the table for exactly those partitions (at start, after a rebalance)."""
        if partitions == self.owned or time.monotonic() < self._wake_not_before:
            return
        tools: set[str] = set()
        if partitions:
            self.round_trips += 1
            try:
                rows = self.conn.execute(
                    "SELECT DISTINCT tool FROM decision_waits WHERE partition = ANY(%s)", (sorted(partitions),)
                ).fetchall()
            except Exception:
                self._wake_not_before = time.monotonic() + 1.0  # PostgreSQL down: not at every poll
                raise
            tools = {tool for (tool,) in rows}
        # Set only once read: a failed read (PostgreSQL down) is tried again at the next tick.
        self.owned, self.waiting = partitions, tools
        log.info("partitions assigned", extra={"partitions": sorted(partitions), "waiting_for": sorted(tools)})

    def wake(self) -> int:
        """Decide again up to ``wake_batch`` waiting runs whose tool is now available; returns how many.

        Called between batches (the runtime's tick). The runs come from ``decision_waits``, oldest
        first, in the owned partitions only; a row is the proof that the run still waits (see the
        module's docstring), and deciding the run deletes it, so the next tick reads the next page.
        """
        if not self.waiting or time.monotonic() < self._wake_not_before:
            return 0
        ready = [tool for tool in sorted(self.waiting) if self.available(tool)]
        if not ready:
            return 0
        budget = self.settings.wake_batch
        rows: list[tuple[str, int, int, bytes, bytes]] = []
        drained: list[str] = []
        for tool in ready:
            if budget <= 0:
                break
            page = self._waits(tool, budget)
            if len(page) < budget:
                drained.append(tool)  # every waiting run of this tool is in hand
            budget -= len(page)
            rows += page
        # Out of the index before deciding: a run that waits again for it puts the tool back.
        self.waiting.difference_update(drained)
        if not rows:
            return 0
        self._undo = {}
        woken: list[tuple[StateSnapshot, int]] = []
        stale: list[tuple[str, int]] = []
        for run_id, partition, version, snapshot, decision in rows:
            memory = self.memory.get(run_id)
            if memory is not None and memory.version > version:
                stale.append((run_id, version))  # decided since: its row should be gone; never woken, never read again
                continue
            waited = codec.decode(bytes(snapshot))
            wait = _emission(decision, None, None)
            assert isinstance(waited, StateSnapshot) and wait.record.action is DecisionAction.wait
            self._undo.setdefault(
                run_id, RunMemory(memory.version, memory.decision_id, memory.emission) if memory else None
            )
            self._remember(run_id, RunMemory(version, wait.record.decision_id, wait))
            woken.append((after_wait(waited, wait.record), partition))
            log.debug("waking", extra={"run_id": run_id, "version": version + 1, "tool": wait.record.tool})
        emissions: list[Emission] = []
        new: list[tuple[StateSnapshot, Emission, int]] = []
        try:
            if stale:
                self._drop_waits([(run_id, version + 1) for run_id, version in stale])
            for snap, partition in woken:
                self._one(snap, partition, emissions, new, [])
            decided = {snap.run_id for snap, _, _ in new}
            spent = [(snap.run_id, snap.version) for snap, _ in woken if snap.run_id not in decided]
            if spent:
                # The decider had nothing to decide on the state after the wait: the wake is spent (its
                # row would otherwise head every page). The run moves on with its next snapshot.
                for run_id, version in spent:
                    log.warning("woken run had nothing to decide", extra={"run_id": run_id, "version": version})
                self._drop_waits(spent)
            emissions += self._store(new)
            self._undo = {}
            self._emit(emissions, [])
            if self.producer.flush(30):
                raise DependencyUnavailable("kafka", "woken decisions not acknowledged; tried again")
        except Exception:
            # Nothing to restore but memory and the index: the rows of runs not decided are still there.
            self._forget_unstored()
            self.waiting.update(drained)
            self._wake_not_before = time.monotonic() + 1.0
            raise
        log.info("woke %d run(s) waiting for %s", len(woken), ", ".join(ready), extra={"woken": len(woken)})
        return len(woken)

    def _waits(self, tool: str, limit: int) -> list[tuple[str, int, int, bytes, bytes]]:
        """One page of the runs waiting for ``tool`` in the owned partitions, oldest first, each with
        the recorded wait (joined: a row without its decision is not a wait this layer made)."""
        self.round_trips += 1
        owned = sorted(self.owned) if self.owned is not None else None
        rows = self.conn.execute(
            "SELECT w.run_id, w.partition, w.based_on_version, w.snapshot, d.decision_event"
            " FROM decision_waits w JOIN decisions d"
            " ON d.run_id = w.run_id AND d.based_on_version = w.based_on_version"
            " WHERE w.tool = %s AND (%s::int[] IS NULL OR w.partition = ANY(%s::int[]))"
            " ORDER BY w.since, w.run_id LIMIT %s",
            (tool, owned, owned, limit),
        ).fetchall()
        return [(r, int(p), int(v), bytes(snap), bytes(dec)) for r, p, v, snap, dec in rows]

    def _drop_waits(self, waits: list[tuple[str, int]]) -> None:
        """Delete the wait rows of runs decided since (run, the version a later decision replaced)."""
        self.round_trips += 1
        self.conn.execute(
            "DELETE FROM decision_waits w USING unnest(%s::text[], %s::bigint[]) AS c(run_id, version)"
            " WHERE w.run_id = c.run_id AND w.based_on_version < c.version",
            ([run_id for run_id, _ in waits], [version for _, version in waits]),
        )

    def _resend(self, snap: StateSnapshot, memory: RunMemory, resends: list[tuple[StateSnapshot, Emission]]) -> None:
        """The state processor found this run's command lost: send the recorded command again."""
        wanted = snap.redrive_command_id or ""
        emission = memory.emission.only(wanted) if memory.emission is not None else None
        if emission is None:
            found = self._by_command(snap.run_id, wanted)
            emission = found.only(wanted) if found is not None else None
        if emission is None or not emission.is_command:
            log.error("asked to re-send an unknown command", extra={"run_id": snap.run_id})
            return
        DECISIONS.labels(self.decider.name, "redriven").inc()
        resends.append((snap, self._signed(emission)))

    def _signed(self, emission: Emission) -> Emission:
        """The recorded command as its tool will accept it. Recorded commands are signed, so this is
        the stored bytes unchanged, unless the command was recorded before signing existed or under a
        key since retired: re-signed then (same ids, so the tool ledger still runs it once)."""
        assert emission.follow_up is not None
        command = codec.decode(emission.follow_up)
        if not isinstance(command, ToolCommand):
            return emission
        keys = tool_keys(self.keys, command.tool)
        if verify(command, keys) is None:
            return emission
        log.info("re-signing a recorded command", extra={"run_id": command.run_id, "command_id": command.command_id})
        return replace(emission, follow_up=codec.encode(sign(command, keys)))

    # -- the database: one statement per batch ----------------------------------------------------
    def _remember(self, run_id: str, memory: RunMemory) -> RunMemory:
        self.memory[run_id] = memory
        self.memory.move_to_end(run_id)
        while len(self.memory) > self.memory_size:
            self.memory.popitem(last=False)
        return memory

    def _recall(self, snaps: list[StateSnapshot]) -> None:
        """Load the latest recorded decision of runs this process does not remember (after a restart)."""
        # A run's first snapshot usually has no decision yet, and deciding it again by the rules costs
        # nothing (the stored decision wins); a costly decider (a model call) looks for one first.
        unknown = sorted(
            {s.run_id for s in snaps if s.run_id not in self.memory and (s.version > 1 or self.recall_first)}
        )
        for run_id in {s.run_id for s in snaps if s.run_id in self.memory}:
            self.memory.move_to_end(run_id)
        if not unknown:
            return
        self.round_trips += 1
        rows = self.conn.execute(
            "SELECT DISTINCT ON (run_id) run_id, based_on_version, decision_id, decision_event, follow_up_topic,"
            " follow_up_event, parallel_follow_ups FROM decisions WHERE run_id = ANY(%s)"
            " ORDER BY run_id, based_on_version DESC",
            (unknown,),
        ).fetchall()
        for run_id, version, decision_id, decision, topic, follow, more in rows:
            self._remember(run_id, RunMemory(int(version), decision_id, _emission(decision, topic, follow, more)))

    def _recorded(self, snap: StateSnapshot) -> Emission | None:
        self.round_trips += 1
        row = self.conn.execute(
            "SELECT decision_event, follow_up_topic, follow_up_event, parallel_follow_ups FROM decisions"
            " WHERE run_id = %s AND based_on_version = %s",
            (snap.run_id, snap.version),
        ).fetchone()
        return _emission(*row) if row else None

    def _by_command(self, run_id: str, command_id: str) -> Emission | None:
        self.round_trips += 1
        rows = self.conn.execute(
            "SELECT decision_event, follow_up_topic, follow_up_event, parallel_follow_ups FROM decisions"
            " WHERE run_id = %s AND follow_up_topic IS NOT NULL ORDER BY based_on_version DESC",
            (run_id,),
        ).fetchall()
        for row in rows:
            emission = _emission(*row)
            if any(d.command_id == command_id for d in emission.record.dispatched()):
                return emission
        return None

    def _store(self, new: list[tuple[StateSnapshot, Emission, int]]) -> list[Emission]:
        """Record every new decision in one statement, before anything is produced.

        The same statement keeps ``decision_waits`` in step (one transaction, so a wait row exists
        exactly while the run's latest decision is that wait): a new wait files its run with the
        snapshot and partition, any other new decision deletes the run's older wait row.

        A decision another instance recorded first (a rebalance) wins: its bytes are emitted, not ours.
        """
        if not new:
            return []
        self.round_trips += 1
        records = [(snap, e, codec.encode(e.record), partition) for snap, e, partition in new]
        for _, emission, encoded, _ in records:
            emission.encoded = encoded
        waits = [e.record.tool if e.record.action is DecisionAction.wait else None for _, e, _, _ in records]
        rows = self.conn.execute(
            "WITH incoming AS (SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[],"
            " %s::bytea[], %s::text[], %s::bytea[], %s::text[], %s::int[], %s::bytea[], %s::bigint[],"
            " %s::bigint[], %s::float8[], %s::jsonb[])"
            " AS n(run_id, based_on_version, decision_id, action, step, decision_event, follow_up_topic,"
            " follow_up_event, wait_tool, partition, snapshot, prompt_tokens, completion_tokens, cost_usd,"
            " parallel_follow_ups)),"
            " inserted AS (INSERT INTO decisions (run_id, based_on_version, decision_id, action, step,"
            " decision_event, follow_up_topic, follow_up_event, prompt_tokens, completion_tokens, cost_usd,"
            " parallel_follow_ups)"
            " SELECT run_id, based_on_version, decision_id, action, step, decision_event, follow_up_topic,"
            " follow_up_event, prompt_tokens, completion_tokens, cost_usd, parallel_follow_ups FROM incoming"
            " ON CONFLICT DO NOTHING RETURNING run_id, based_on_version),"
            " decided AS (SELECT n.* FROM incoming n JOIN inserted i USING (run_id, based_on_version)),"
            " unwaited AS (DELETE FROM decision_waits w USING decided d WHERE d.wait_tool IS NULL"
            " AND w.run_id = d.run_id AND w.based_on_version < d.based_on_version),"
            # A run that waits again keeps its place in the queue if it waits for the same tool.
            " waited AS (INSERT INTO decision_waits (run_id, tool, partition, based_on_version, snapshot)"
            " SELECT run_id, wait_tool, partition, based_on_version, snapshot FROM decided"
            " WHERE wait_tool IS NOT NULL ON CONFLICT (run_id) DO UPDATE SET tool = EXCLUDED.tool,"
            " partition = EXCLUDED.partition, based_on_version = EXCLUDED.based_on_version,"
            " snapshot = EXCLUDED.snapshot,"
            " since = CASE WHEN decision_waits.tool = EXCLUDED.tool THEN decision_waits.since ELSE now() END"
            " WHERE decision_waits.based_on_version < EXCLUDED.based_on_version)"
            " SELECT run_id, based_on_version FROM inserted",
            (
                [s.run_id for s, _, _, _ in records],
                [s.version for s, _, _, _ in records],
                [e.record.decision_id for _, e, _, _ in records],
                [e.record.action.value for _, e, _, _ in records],
                [e.record.step for _, e, _, _ in records],
                [encoded for _, _, encoded, _ in records],
                [e.topic for _, e, _, _ in records],
                [e.follow_up for _, e, _, _ in records],
                waits,
                [partition for _, _, _, partition in records],
                [
                    codec.encode(s) if tool is not None else None
                    for (s, _, _, _), tool in zip(records, waits, strict=True)
                ],
                # What each decision spent, as numbers: the per-run caps sum them before a model call.
                [e.record.prompt_tokens for _, e, _, _ in records],
                [e.record.completion_tokens for _, e, _, _ in records],
                [e.record.cost_usd for _, e, _, _ in records],
                [_more_column(e) for _, e, _, _ in records],
            ),
        ).fetchall()
        inserted = {(run_id, int(version)) for run_id, version in rows}
        out: list[Emission] = []
        replaced: list[tuple[str, int]] = []
        for snap, emission, _, _ in records:
            if (snap.run_id, snap.version) in inserted:
                DECISIONS.labels(self.decider.name, "recorded").inc()
                decision_recorded(emission.record)
                out.append(emission)
                continue
            theirs = self._recorded(snap)
            assert theirs is not None
            self._remember(snap.run_id, RunMemory(snap.version, theirs.record.decision_id, theirs))
            self._note_wait(theirs.record)
            if theirs.record.action is not DecisionAction.wait:
                replaced.append((snap.run_id, snap.version))
            DECISIONS.labels(self.decider.name, "replayed").inc()
            out.append(theirs)
        if replaced:
            # Their statement deleted any older wait row already; this only makes sure no row outlives
            # a newer decision (a row left behind would be woken, and skipped, at every tick).
            self._drop_waits(replaced)
        # Per step: a fan-out's steps each read their own entities.
        read = [
            (e.record.model_copy(update={"step": d.step, "memory": d.memory}) if e.record.parallel else e.record, p)
            for _, e, _, p in records
            for d in (e.record.dispatched() if e.record.parallel else [e.record])
            if d.memory
        ]
        if read:  # what they read, for the memory watch (a statement only for decisions that read memory)
            self.round_trips += 1
            MemoryWatch.note(self.conn, read)
        return out

    # -- producing ---------------------------------------------------------------------------------
    def _emit(self, emissions: list[Emission], resends: list[tuple[StateSnapshot, Emission]]) -> None:
        """Commands first; once acknowledged, each decision with where its command landed, then endings."""
        landed: dict[tuple[int, str], tuple[int, int]] = {}
        # Every command, keyed by (its emission, its command id): a fan-out's decision sends several.
        pending: list[tuple[tuple[int, str], str, str, bytes]] = []
        for i, e in enumerate(emissions):
            if e.is_command and e.topic and e.follow_up:
                pending.append(((i, e.record.command_id or ""), e.record.run_id, e.topic, e.follow_up))
                pending += [
                    ((i, d.command_id), e.record.run_id, topic, value)
                    for d, (topic, value) in zip(e.record.parallel, e.more, strict=True)
                ]
        for i, (_, e) in enumerate(resends):
            assert e.topic is not None and e.follow_up is not None
            pending.append(((len(emissions) + i, e.record.command_id or ""), e.record.run_id, e.topic, e.follow_up))
        events = self.settings.topic(RUN_EVENTS)
        for key, run_id, topic, value in pending:
            headers = None
            if topic == events:
                # A child run's request: keyed by the child's run id, signed as this processor's.
                run_id, headers = _run_of(value), self.signer.headers(value)
            self.producer.produce(
                topic, key=run_id.encode(), value=value, headers=headers, on_delivery=_landed(landed, key)
            )
        if pending:
            remaining = self.producer.flush(30)
            if remaining:
                raise DependencyUnavailable("kafka", f"{remaining} command(s) not acknowledged; the batch is retried")
        for index, emission in enumerate(emissions):
            value = emission.encoded or codec.encode(emission.record)
            if emission.more:
                commands = [d.command_id for d in emission.record.dispatched()]
                value = codec.with_landings(value, {c: landed[(index, c)] for c in commands if (index, c) in landed})
            elif (index, emission.record.command_id or "") in landed:
                value = codec.with_landing(value, *landed[(index, emission.record.command_id or "")])
            key = emission.record.run_id.encode()
            self.producer.produce(events, key=key, value=value, headers=self.signer.headers(value))
            if not emission.is_command and emission.topic and emission.follow_up:
                self.producer.produce(
                    emission.topic, key=key, value=emission.follow_up, headers=self.signer.headers(emission.follow_up)
                )
                # A parent's ending: the endings of its live children, each keyed by its own run.
                for topic, value in emission.more:
                    self.producer.produce(
                        topic, key=_run_of(value).encode(), value=value, headers=self.signer.headers(value)
                    )
        for i, (snap, emission) in enumerate(resends):
            partition, offset = landed[(len(emissions) + i, emission.record.command_id or "")]
            step = snap.step(emission.record.step or "")
            resent = CommandResent(
                event_id=stable_id(emission.record.command_id or "", "resent", str(step.redrives)),
                run_id=snap.run_id,
                causation_id=snap.last_event_id,
                command_id=emission.record.command_id or "",
                step=step.name,
                tool=emission.record.tool or "",
                redrive=step.redrives,
                command_partition=partition,
                command_offset=offset,
            )
            RESENT_COMMANDS.labels(resent.tool).inc()
            value = codec.encode(resent)
            self.producer.produce(events, key=snap.run_id.encode(), value=value, headers=self.signer.headers(value))


def _command_of(event: Event | None) -> str | None:
    """The parent's command id a follow-up carries: a tool command's, or a child run's request's."""
    if isinstance(event, RunRequested):
        return event.parent_command_id
    return getattr(event, "command_id", None)


def _run_of(value: bytes) -> str:
    """The run a follow-up on the run log belongs to (a child's request or ending): its record key."""
    return codec.decode(value).run_id


def _landed(landed: dict[tuple[int, str], tuple[int, int]], key: tuple[int, str]) -> Callable[[Any, Any], None]:
    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            landed[key] = (msg.partition(), msg.offset())

    return on_delivery


def make_decider(
    settings: Settings,
    available: ToolAvailability = every_tool_available,
    check: ArgumentCheck = no_check,
    entry_of: EntryOf | None = None,
    memory: MemoryReader = no_memory,
) -> Decider:
    """The configured decider; its workflows are read here, so a malformed file stops the processor at start.

    The model decides the runs of workflows that say ``decider = "llm"``, and of those that say nothing
    when ``STREAMAGENT_DECIDER=llm``; without an endpoint to ask, the start is refused in one line."""
    from streamagent.processors.decision.rules import RulesDecider

    workflows = load_workflows(settings.workflows_dir)
    rules = RulesDecider(workflows, available, check, memory)
    by_model = sorted(
        w.name for w in workflows.values() if (w.decider or settings.decider) == "llm" and not w.has_children
    )
    if not by_model:
        return rules
    if not settings.openai_base_url:
        raise SettingsError(
            f"the llm decider (for workflow(s) {', '.join(by_model)}) needs {env_name('openai_base_url')}:"
            " the OpenAI-compatible endpoint to ask, e.g. https://api.openai.com/v1"
        )
    from streamagent.processors.decision.llm.decider import LlmDecider

    llm = LlmDecider(settings, workflows, available, check, entry_of or (lambda _name: None), memory=memory)
    return ChosenDecider(settings.decider, workflows, rules, llm, concurrency=settings.model_concurrency)


def build(settings: Settings) -> ConsumerRuntime:
    """The decision processor, deciding with the live tool catalogue.

    The catalogue follows the registry topic on a background thread (undecodable registry messages
    dead-lettered); a step's tool must be available there, and its arguments must fit the input schema
    that tool announced. After every poll the handler wakes the runs waiting for a tool that is now
    available (a page of ``wake_batch`` per poll, from the table), so a run decided before its tool
    announced itself (at stack start, or a tool deployed later, or before this process restarted)
    moves on as soon as the tool is there.
    """
    make_decider(settings)  # first: a malformed workflow file stops the start at once
    keys = load_keys(settings)  # and no signing key stops it too, before anything connects
    load_approval_keys(settings)
    load_policy(settings.policies_dir)  # and a malformed policy file (PolicyError: file, field, reason)
    db.migrate(settings, SCHEMA, wait_s=db.WAIT_FOREVER)  # started during an outage: wait, do not crash-loop
    runtime = ConsumerRuntime(
        settings, PROCESSOR, [settings.topic(RUN_STATE)], lambda _: None, dependencies=("kafka", "postgres")
    )
    catalogue = Catalogue(settings, dead_letters=DeadLetterSink(settings, runtime.producer, "catalogue"))
    catalogue.start()  # read to its end first, then followed; stopped with the process (a daemon thread)

    inputs = catalogue_inputs(catalogue.available)
    # Shared memory, a local table of the memory topic (followed on a background thread): reading the
    # entities a step reads is a dict lookup per entity, never a network call.
    memory = MemoryTable(settings, "decision-memory", Authenticator(keys)).start()
    decider = make_decider(settings, inputs.available, inputs.check, inputs.entry_of, memory.current)
    guard = GuardStage(settings, inputs.declared_approval, keys=load_approval_keys(settings))
    handler = DecisionHandler(
        settings, decider, runtime.producer, available=inputs.available, keys=keys, guard=guard, snapshot_keys=keys
    )
    runtime.handler = handler
    runtime.on_revoke.append(handler.revoked)
    state_topic = settings.topic(RUN_STATE)

    watch = MemoryWatch(memory, runtime.producer, handler.signer, settings.topic(RUN_EVENTS))
    workflows = load_workflows(settings.workflows_dir)
    if any(step.writes for w in workflows.values() for step in w.steps):
        handler.memory_writer = MemoryWriter(workflows, runtime.producer, handler.signer, settings.topic(MEMORY_WRITES))

    def tick() -> None:
        # The assignment first: a restarted instance, or one given another's partitions, learns from
        # the table what their runs wait for before it wakes anything.
        owned = runtime.assigned(state_topic)
        handler.assign(owned)
        handler.wake()
        watch.tick(handler.conn, owned)

    runtime.tick = tick
    return runtime
