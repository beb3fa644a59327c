"""The tool runtime: consumes commands, executes each at most once, publishes the result.

Commands of one partition run concurrently, so a command that is backing off does not hold up
the others; commands of the same run still run one at a time, in order. An offset is committed
only when every command before it has its ledger row final and its result acknowledged by the
broker. A command seen again (redelivery, replay, restart) publishes its recorded result.

Only the pipeline commands a tool: every command's signature (``streamagent.signing``) is verified
first, before the ledger or any external call sees it; an unsigned, forged or altered command is
dead-lettered ``unauthenticated`` and has no effect. Then (``admission``): a command already done
republishes its result; an ``execute`` command of a run that ended, or of a decision its run never
recorded, is dead-lettered ``stale``; one that needs a person's approval (policy) without a valid
token, ``unapproved``. Neither is claimed, called or answered. Each external call then waits for the
tool's rate limit (``ratelimit``), read from the policy in force.

The hot path is cheap: two database round trips per consumed batch, one that admits its commands
(``admission.ADMIT_SQL``) and one that claims the ledger rows of those admitted (``Ledger.claim``);
attempt counts and final results of concurrent commands are group-committed (``LedgerWriter``);
results and dead letters are acknowledged by delivery reports, handed to the event loop once per
producer poll, never by flushing per message; offsets are committed every ``COMMIT_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from streamagent.tools.sdk import admission
from streamagent.tools.sdk.breaker import CircuitBreaker
from streamagent.tools.sdk.errors import PermanentError, RetryableError
from streamagent.tools.sdk.ledger import Claimed, ClaimRequest, Ledger, LedgerEntry, LedgerWriter, Stopping
from streamagent.tools.sdk.offsets import PartitionOffsets
from streamagent.tools.sdk.ratelimit import RateLimiter
from streamagent.tools.sdk.schema import SCHEMA as LEDGER_SCHEMA
from streamagent.tools.sdk.tool import CallContext, ModelBudget, ModelUse, Tool
from streamagent.tools.sdk.transport import AiohttpTransport

from streamagent import codec, db, tracing
from streamagent.approval import load_approval_keys
from streamagent.authn import RoleKeys, role_keys, tool_role
from streamagent.config import Settings
from streamagent.dlq import DeadLetterSink
from streamagent.errors import DependencyUnavailable, Rejected, outage
from streamagent.events import STALE_MEMORY, ToolCommand, ToolResult, ToolStatus, stable_id
from streamagent.kafka import consumer as make_consumer
from streamagent.kafka import producer as make_producer
from streamagent.members import MemberAnnouncer, confluent_partitions
from streamagent.memory import MemoryTable, stale
from streamagent.metrics import (
    EVENTS_PROCESSED,
    TOOL_ATTEMPTS,
    TOOL_CALL_SECONDS,
    TOOL_CALLS,
    TOOL_IN_FLIGHT,
    DependencyHealth,
    HopTimer,
)
from streamagent.policy import PolicyStore
from streamagent.retry import RetryPolicy
from streamagent.signing import CommandKeys, verify
from streamagent.topics import TOOL_REGISTRY, TOOL_RESULTS, command_topic

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2
# Connections per HTTP client (see ``_HttpClients``).
HTTP_SHARD_CONNECTIONS = 16
# Re-sends of a dead letter whose delivery failed (librdkafka already retried it for its message timeout).
DEAD_LETTER_RETRY = RetryPolicy(initial_s=0.5, max_backoff_s=5.0)
# A command that met an outage (its result not acknowledged by the broker, ...) is run again, not
# dead-lettered: from its ledger row, so its effect is not repeated.
OUTAGE_RETRY = RetryPolicy(initial_s=0.1, max_backoff_s=2.0)
# Under saturation the consumer is still polled this often (its partitions paused), so it keeps its
# group membership while commands wait out an outage (max.poll.interval.ms).
KEEPALIVE_S = 1.0
# How long a stopping tool waits for its leave announcement to be acknowledged.
LEAVE_TIMEOUT_S = 2.0


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge a produced message."""


class _AckedProducer:
    """What the dead-letter sink produces through: each message gets a delivery future, ``last``."""

    def __init__(self, runner: ToolRunner) -> None:
        self._runner = runner
        self.last: asyncio.Future[None] | None = None

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.last = self._runner._produce_acked(topic, **kwargs)


class _HttpClients:
    """Several small httpx clients instead of one of ``max_in_flight`` connections.

    httpcore's pool walks all its connections (checking each socket) on every request and response,
    and counts its idle ones once per idle connection: with hundreds of connections that walk cost
    more CPU than the rest of a command. Each attempt leases the least busy client, so no client
    holds more than ``HTTP_SHARD_CONNECTIONS`` requests and the total stays ``max_in_flight``.
    """

    def __init__(
        self,
        settings: Settings,
        max_in_flight: int,
        timeout_s: float | None = None,
        base_url: str = "",
        httpcore: bool = False,  # httpx's own transport below the clients (bench/http_client.py compares)
    ) -> None:
        shards = max(1, math.ceil(max_in_flight / HTTP_SHARD_CONNECTIONS))
        per_shard = math.ceil(max_in_flight / shards)
        timeout = httpx.Timeout(timeout_s or settings.tool_timeout_s)
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        verify = httpx.create_ssl_context()  # loading the CA bundle once, not once per client
        base_url = base_url or settings.sandbox_url
        instant: httpx.AsyncBaseTransport | None = None
        if settings.tools_instant and base_url == settings.sandbox_url:
            # The benchmark's instant tools: sandbox calls answered in this process. Imported here: a
            # tool process otherwise never loads the sandbox (and its HTTP server).
            from streamagent.tools.sdk.instant import InstantTransport

            instant = InstantTransport()
        # httpx's API for tools, aiohttp's C parser and pool below it (tools/sdk/transport.py); httpx's own
        # transport (None) where ``httpcore`` asks for it, the in-process sandbox for instant tools.
        transports = [instant or (None if httpcore else AiohttpTransport(per_shard, ssl=verify)) for _ in range(shards)]
        self.clients = [
            httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, verify=verify, transport=t)
            for t in transports
        ]
        # What ``CallContext.request`` may call directly, by client.
        self._direct = {
            id(c): t for c, t in zip(self.clients, transports, strict=True) if isinstance(t, AiohttpTransport)
        }
        self.busy = [0] * shards

    def direct(self, client: httpx.AsyncClient) -> AiohttpTransport | None:
        return self._direct.get(id(client))

    @contextlib.contextmanager
    def lease(self) -> Iterator[httpx.AsyncClient]:
        index = min(range(len(self.busy)), key=self.busy.__getitem__)
        self.busy[index] += 1
        try:
            yield self.clients[index]
        finally:
            self.busy[index] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class ToolRunner:
    def __init__(
        self,
        settings: Settings,
        tool: Tool[Any, Any],
        *,
        max_in_flight: int | None = None,
        breaker: CircuitBreaker | None = None,
        consumer_config: dict[str, object] | None = None,
        keys: CommandKeys | None = None,
        approval_keys: CommandKeys | None = None,
        policies: PolicyStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        # This tool's own key set (streamagent.authn.tool_keys), read once at start (no key refuses the
        # start): commands verify under it, and results are signed with it as written by this tool.
        # The tool holds no other key: it can neither command another tool nor answer for one.
        self.keys = keys if keys is not None else role_keys(settings, tool_role(tool.name)).keys
        self.signer = RoleKeys(tool_role(tool.name), self.keys)
        self.approval_keys = approval_keys if approval_keys is not None else load_approval_keys(settings)
        # A malformed policy refuses the start (PolicyError); a bad edit later keeps the last good one.
        self.policies = policies or PolicyStore(settings.policies_dir, settings.policy_reload_s)
        self.limiter = RateLimiter(tool.name, self.policies, clock)
        self.consumer_config = consumer_config or {}
        self.tool = tool
        self.topic = settings.topic(command_topic(tool.name))
        self.max_in_flight = max(1, max_in_flight or settings.tool_max_in_flight)
        self.batch_size = settings.batch_size
        # Under saturation, consume again once this many slots are free: batches stay batches.
        self._resume_free = max(1, min(self.batch_size, self.max_in_flight // 8))
        self.breaker = breaker or CircuitBreaker(tool.name)
        self.processor = f"tool.{tool.name}"
        self.health = DependencyHealth(self.processor, ("kafka", "postgres", "sandbox"))
        self.stop_event = asyncio.Event()
        self._stopped = threading.Event()  # the same, for code waiting in a thread
        self.producer = make_producer(settings)
        self._dlq_producer = _AckedProducer(self)
        self.dead_letters = DeadLetterSink(settings, self._dlq_producer, self.processor)  # type: ignore[arg-type]
        self._kafka = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka")
        self._offsets: dict[tuple[str, int], PartitionOffsets] = defaultdict(PartitionOffsets)
        # The last command of each run accepted so far: the next one of that run waits for it.
        self._run_tails: dict[str, asyncio.Future[None]] = {}
        # Accepted, unfinished messages per command id; results of ids that have more than one.
        self._active: Counter[str] = Counter()
        self._recent: dict[str, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Event()
        self._reports: list[tuple[asyncio.Future[None], Any]] = []  # delivery reports, poll thread only
        self._results_topic = settings.topic(TOOL_RESULTS)
        self._processed: dict[str, Any] = {}
        self._hops = HopTimer(self.processor)
        TOOL_IN_FLIGHT.labels(tool.name).set_function(lambda: len(self._tasks))  # read at scrape time only
        self.claimed_batches = 0  # consumed batches that carried commands: one claim round trip each
        self._stopping = False  # tells the producer-poll thread to flush and end
        # This process's key on the registry topic: stable across restarts when the supervisor gives
        # it a group instance id, so a restarted member replaces its own announcement.
        self.member_id = settings.group_instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self._started_at_ms = int(time.time() * 1000)
        self.timeout_s = tool.call_timeout(settings.tool_timeout_s)
        # The shared memory table, started with the first command that read memory (most tools never do).
        self._memory: MemoryTable | None = None
        # One table per process: commands that read memory arrive together, and each that found no
        # table started its own, a consumer polling for the life of the process (a burst on a fresh
        # member left a dozen, which cost the embedded broker more than the rest of the tool).
        self._memory_lock = asyncio.Lock()
        # This member's partitions, lag and work on the members topic (`streamagent status`).
        self.members = MemberAnnouncer(settings, self.producer, self.processor)

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        # Started during a PostgreSQL outage: wait for it (stoppable), do not crash-loop.
        migrate = functools.partial(
            db.migrate, self.settings, LEDGER_SCHEMA, wait_s=db.WAIT_FOREVER, stop=self._stopped
        )
        await loop.run_in_executor(None, migrate)
        await loop.run_in_executor(None, admission.require_decisions_table, self.settings)
        self.ledger = await Ledger.open(self.settings, stop=self.stop_event, health=self.health)
        self.writer = LedgerWriter(self.ledger, max_batch=max(self.max_in_flight, 1))
        consumer = make_consumer(self.settings, self.processor, **self.consumer_config)
        consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._revoked)
        self._consumer = consumer
        poller = loop.run_in_executor(None, self._poll_producer)
        await self._announce("up")
        heartbeat = asyncio.create_task(self._heartbeat())
        # A tool of another team's package calls that team's API (``tool_urls``), the others the sandbox.
        base_url = self.settings.tool_url(self.tool.name)
        self._http = _HttpClients(self.settings, self.max_in_flight, self.timeout_s, base_url)
        self.http = self._http.clients[0]
        try:
            log.info("tool consuming", extra={"tool": self.tool.name, "topic": self.topic})
            last_commit = last_poll = time.monotonic()
            paused: list[TopicPartition] = []
            while not self.stop_event.is_set():
                free = self.max_in_flight - len(self._tasks)
                if free < self._resume_free:
                    self._slots.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slots.wait(), timeout=0.1)
                    if time.monotonic() - last_poll >= KEEPALIVE_S:
                        # Saturated for a while (commands waiting out an outage, or a slow API): poll
                        # with the partitions paused to stay in the group.
                        paused = await loop.run_in_executor(self._kafka, self._keepalive)
                        last_poll = time.monotonic()
                else:
                    if paused:
                        await loop.run_in_executor(self._kafka, self._resume, paused)
                        paused = []
                    size = min(self.batch_size, free)
                    batch = await loop.run_in_executor(self._kafka, consumer.consume, size, 0.1)
                    last_poll = time.monotonic()
                    if batch:
                        self._accept(batch)
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    await self._commit()
                    last_commit = time.monotonic()
                if self.members.due():
                    await loop.run_in_executor(self._kafka, self._announce_member)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=10)
            await self._commit()
        finally:
            heartbeat.cancel()
            await self._http.aclose()
        await self._leave()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(self._kafka, self._announce_member, "left")
        await self.writer.close()
        self._stopping = True
        await poller
        await loop.run_in_executor(self._kafka, consumer.close)
        if self._memory is not None:
            await loop.run_in_executor(None, self._memory.stop)
        await self.ledger.close()
        log.info("tool stopped", extra={"tool": self.tool.name})

    def stop(self) -> None:
        self.stop_event.set()
        self._stopped.set()

    def _keepalive(self) -> list[TopicPartition]:
        """In the Kafka thread: pause every assigned partition and poll once. A message still comes
        from a partition assigned since; it is accepted (slightly over ``max_in_flight``), not lost."""
        paused = self._consumer.assignment()
        with contextlib.suppress(KafkaException):
            self._consumer.pause(paused)
        batch = self._consumer.consume(self.batch_size, 0)
        if batch:
            self._loop.call_soon_threadsafe(self._accept, batch)
        return paused

    def _resume(self, paused: list[TopicPartition]) -> None:
        with contextlib.suppress(KafkaException):
            self._consumer.resume(paused)

    async def _announce(self, state: str) -> None:
        announcement = self.tool.declaration(
            member_id=self.member_id,
            state=state,
            at_ms=int(time.time() * 1000),
            started_at_ms=self._started_at_ms,
            lease_ms=int(self.settings.registry_lease_s * 1000),
        )
        await self._produce(self.settings.topic(TOOL_REGISTRY), announcement.key(), announcement.encode())

    async def _heartbeat(self) -> None:
        """Re-announce every ``registry_heartbeat_s`` while running: the member's lease in the catalogue."""
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=self.settings.registry_heartbeat_s)
            if self.stop_event.is_set():
                return
            try:
                await self._announce("up")
            except Exception as exc:  # an outage: the lease may lapse; the next heartbeat renews it
                log.warning("heartbeat not delivered: %r", exc, extra={"tool": self.tool.name})

    async def _leave(self) -> None:
        """Tell the catalogue this member is gone. Bounded, and skipped while the broker is down: the
        lease then lapses instead, and the stop is not held up."""
        if self.health.is_down("kafka"):
            return
        try:
            await asyncio.wait_for(self._announce("left"), timeout=LEAVE_TIMEOUT_S)
        except Exception as exc:
            log.warning("leave announcement not delivered: %r", exc, extra={"tool": self.tool.name})

    def _announce_member(self, state: str = "up") -> None:
        """In the Kafka thread: what this member owns now, on the members topic."""
        partitions = confluent_partitions(self._consumer) if state == "up" else []
        self.members.announce(partitions, "left" if state == "left" else "up")

    def _assigned(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        if partitions:
            self.members.rebalances += 1
            self.members.next_soon()
            log.info(
                "partitions assigned", extra={"tool": self.tool.name, "partitions": [p.partition for p in partitions]}
            )

    def _revoked(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        if partitions:
            self.members.rebalances += 1
            self.members.next_soon()
            log.info(
                "partitions revoked", extra={"tool": self.tool.name, "partitions": [p.partition for p in partitions]}
            )
        # Called from the Kafka thread. Commands of revoked partitions may still finish here; the new
        # owner finds them in the ledger (or re-runs them under the same idempotency key), so nothing
        # runs twice.
        self._loop.call_soon_threadsafe(self._forget, [(tp.topic, tp.partition) for tp in partitions])

    def _forget(self, partitions: list[tuple[str, int]]) -> None:
        for key in partitions:
            self._offsets.pop(key, None)

    async def _commit(self) -> None:
        offsets = []
        for (topic, partition), tracker in list(self._offsets.items()):
            offset = tracker.committable()
            if offset is not None:
                offsets.append(TopicPartition(topic, partition, offset))
                tracker.committed = offset
        if offsets:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._kafka, self._commit_owned, offsets)
            except Exception as exc:  # a rebalance can refuse a commit; the work is redone, safely
                log.warning("commit failed: %r", exc)

    def _commit_owned(self, offsets: list[TopicPartition]) -> None:
        """In the Kafka thread (where rebalances happen, so the assignment cannot change meanwhile):
        commit only the partitions this member still owns; a revoked one's offsets are its new owner's
        to commit (the forgetting of its tracker may not have reached the loop yet)."""
        owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        mine = [tp for tp in offsets if (tp.topic, tp.partition) in owned]
        if mine:
            self._consumer.commit(offsets=mine, asynchronous=False)

    # -- a consumed batch ------------------------------------------------------------------------
    def _accept(self, batch: list[Message]) -> None:
        """Start one task per message; the batch's commands share one claim round trip."""
        commands: list[tuple[Message, PartitionOffsets, ToolCommand]] = []
        for msg in batch:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            topic = msg.topic()
            counter = self._processed.get(topic)
            if counter is None:
                counter = self._processed[topic] = EVENTS_PROCESSED.labels(self.processor, topic)
            counter.inc()
            self.members.processed += 1
            tracker = self._offsets[(topic, msg.partition())]
            tracker.received(msg.offset())
            try:
                command = self._decode(msg)
            except Rejected as exc:
                self._spawn(self._refuse(msg, tracker, exc.reason, exc.detail))
                continue
            except Exception as exc:
                log.exception("tool failed on %s[%s]@%s", topic, msg.partition(), msg.offset())
                self._spawn(self._refuse(msg, tracker, "processing-error", repr(exc)))
                continue
            self._hops.observe(topic, command)
            commands.append((msg, tracker, command))
        if not commands:
            return
        self.claimed_batches += 1
        requests = []
        for _msg, _tracker, command in commands:
            cid = command.command_id
            # A command id already in flight here is not claimed again: that occurrence finishes
            # first (same run, so in order) and this one then republishes its result.
            first = self._active[cid] == 0
            requests.append(ClaimRequest(cid, command.run_id, command.step, claim=first))
            self._active[cid] += 1
        # Every handler of the batch awaits (and so holds) this future.
        claims = asyncio.ensure_future(self._admit([c for _m, _t, c in commands], requests))  # noqa: RUF006
        loop = asyncio.get_running_loop()
        for index, (msg, tracker, command) in enumerate(commands):
            previous = self._run_tails.get(command.run_id)
            turn: asyncio.Future[None] = loop.create_future()
            self._run_tails[command.run_id] = turn
            self._spawn(self._handle(msg, tracker, command, claims, index, previous, turn))

    async def _admit(self, commands: list[ToolCommand], requests: list[ClaimRequest]) -> list[Claimed | Exception]:
        """The batch's admission check (one statement for its ``execute`` commands) and then the claim
        of those admitted (one statement): per command its claim, or the ``Rejected`` refusing it."""
        policy = self.policies.current()
        refused: dict[int, Exception] = {}
        executes = [i for i, c in enumerate(commands) if c.operation != "compensate"]
        if executes:
            rows = await self.ledger.query(
                "admit", admission.ADMIT_SQL, admission.freshness_params([commands[i] for i in executes])
            )
            for i, fresh in zip(executes, admission.freshness_rows(rows), strict=True):
                command = commands[i]
                if fresh.done:
                    continue  # dedupe comes first: its recorded result is republished
                stale = fresh.stale(command)
                refusal = (
                    Rejected("stale", stale)
                    if stale is not None
                    else admission.unapproved(
                        command,
                        self.tool.requires_approval,
                        policy,
                        self.settings.environment,
                        self.approval_keys,
                    )
                )
                if refusal is not None:
                    log.warning(
                        "refused a command (%s): %s",
                        refusal.reason,
                        refusal.detail,
                        extra={"run_id": command.run_id, "command_id": command.command_id},
                    )
                    refused[i] = refusal
        admitted = [r for i, r in enumerate(requests) if i not in refused]
        claims = iter(await self.ledger.claim(self.tool.name, admitted))
        return [refused[i] if i in refused else next(claims) for i in range(len(requests))]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self.max_in_flight - len(self._tasks) >= self._resume_free:
            self._slots.set()

    def _decode(self, msg: Message) -> ToolCommand:
        """The message's command, verified: anything else is Rejected before it reaches the ledger."""
        command = codec.decode(msg.value(), self.settings.max_event_bytes)  # DecodeError is a Rejected
        if not isinstance(command, ToolCommand) or command.tool != self.tool.name:
            raise Rejected("unexpected-event", f"{type(command).__name__} is not a {self.tool.name} command")
        problem = verify(command, self.keys)
        if problem is not None:
            log.warning(
                "refused an unauthenticated command: %s",
                problem,
                extra={"run_id": command.run_id, "command_id": command.command_id},
            )
            raise Rejected("unauthenticated", problem)
        return command

    async def _refuse(self, msg: Message, tracker: PartitionOffsets, reason: str, detail: str) -> None:
        with contextlib.suppress(Stopping):  # stopping: not done, its offset stays uncommitted
            await self._dead_letter(msg, reason, detail)
            tracker.done(msg.offset())

    # -- one command -----------------------------------------------------------------------------
    async def _handle(
        self,
        msg: Message,
        tracker: PartitionOffsets,
        command: ToolCommand,
        claims: asyncio.Future[list[Claimed | Exception]],
        index: int,
        previous: asyncio.Future[None] | None,
        turn: asyncio.Future[None],
    ) -> None:
        try:
            try:
                try:
                    claimed = (await claims)[index]
                    if isinstance(claimed, Exception):
                        raise claimed
                    if previous is not None:
                        await previous  # commands of one run execute one at a time, in arrival order
                    await self._execute_through_outages(command, claimed.entry)
                finally:
                    self._pass_turn(command.run_id, previous, turn)
            except Rejected as exc:
                await self._dead_letter(msg, exc.reason, exc.detail)
            except Stopping:
                raise
            except Exception as exc:  # one bad command must never stop the tool
                log.exception("tool failed on %s[%s]@%s", msg.topic(), msg.partition(), msg.offset())
                await self._dead_letter(msg, "processing-error", repr(exc))
        except Stopping:
            return  # not done: its offset stays uncommitted
        finally:
            self._release(command.command_id)
        tracker.done(msg.offset())

    async def _execute_through_outages(self, command: ToolCommand, entry: LedgerEntry | None) -> None:
        """``_execute``, run again while a dependency is down (never dead-lettered, never committed
        meanwhile). A retry claims the command afresh, so a result that was recorded is republished
        and an effect already made is not made again."""
        outages = 0
        while True:
            try:
                await self._execute(command, entry)
                return
            except Exception as exc:
                dependency = outage(exc)
                if dependency is None:
                    raise
                outages += 1
                self.health.down(dependency, exc)
                entry = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=OUTAGE_RETRY.backoff(outages))
                if self.stop_event.is_set():
                    raise Stopping from exc

    def _pass_turn(self, run_id: str, previous: asyncio.Future[None] | None, turn: asyncio.Future[None]) -> None:
        """Let the run's next command go, but never before the ones ahead of this one are done."""

        def release(_: Any = None) -> None:
            if not turn.done():
                turn.set_result(None)
            if self._run_tails.get(run_id) is turn:
                del self._run_tails[run_id]

        if previous is None or previous.done():
            release()
        else:
            previous.add_done_callback(release)

    def _release(self, command_id: str) -> None:
        self._active[command_id] -= 1
        if self._active[command_id] <= 0:
            del self._active[command_id]
            self._recent.pop(command_id, None)

    def _remember(self, command_id: str, result_event: bytes) -> None:
        if self._active[command_id] > 1:  # another occurrence waits: it republishes this
            self._recent[command_id] = result_event

    async def _execute(self, command: ToolCommand, entry: LedgerEntry | None) -> None:
        cid = command.command_id
        recorded = self._recent.get(cid)
        if recorded is None and entry is None:
            # Not claimed with its batch (another occurrence was in flight) and that one left no
            # result here: claim it now.
            request = ClaimRequest(cid, command.run_id, command.step)
            (claimed,) = await self.ledger.claim(self.tool.name, [request])
            if isinstance(claimed, Exception):
                raise claimed
            if claimed.entry is None:  # a claim always returns its row (INSERT … ON CONFLICT DO UPDATE)
                raise RuntimeError(f"claiming command {cid} returned no ledger row")
            entry = claimed.entry
        if recorded is None and entry is not None and entry.final:
            recorded = entry.result_event
        if recorded is not None:
            TOOL_CALLS.labels(self.tool.name, "deduplicated").inc()
            log.info(
                "command already done, republishing its result",
                extra={"run_id": command.run_id, "command_id": cid},
            )
            self._remember(cid, recorded)
            await self._produce(self._results_topic, command.run_id.encode(), recorded)
            return
        assert entry is not None
        changed = await self._memory_changed(command)
        if changed:
            await self._stale_memory(command, changed)
            return
        result = await self._attempts(command, entry.attempts)
        encoded = codec.encode(result)
        await self.writer.finish(cid, result.status.value, encoded)  # durable before it is published
        self._remember(cid, encoded)
        await self._produce(self._results_topic, command.run_id.encode(), encoded)
        TOOL_CALLS.labels(self.tool.name, result.status.value).inc()
        TOOL_ATTEMPTS.labels(self.tool.name).observe(result.attempts)

    async def _memory_changed(self, command: ToolCommand) -> list[str]:
        """The shared entities the command was decided on that changed since (empty: none, or it read none).

        The check sits here, after the ledger's dedupe (a command already done republishes its result, whatever
        memory says now) and right before the effect. It waits until this tool's memory table holds every
        version the broker had acknowledged when the check began (one fetch wait, ~50-70 ms, only for
        commands that read memory; the wait holds no thread) and then compares versions: a dict lookup
        per entity."""
        if not command.memory or command.operation != "execute":
            return []
        loop = asyncio.get_running_loop()
        async with self._memory_lock:
            if self._memory is None:
                self._memory = await loop.run_in_executor(
                    None, lambda: MemoryTable(self.settings, f"tool-{self.tool.name}-memory").start()
                )
        table = self._memory
        asked = time.monotonic()
        if not await table.caught_up(asked):
            raise DependencyUnavailable("kafka", f"the memory table did not catch up with {table.topic}")
        return stale(table, command.memory)

    async def _stale_memory(self, command: ToolCommand, changed: list[str]) -> None:
        """Publish that the command was not executed because what it was decided on changed: the fold
        puts the step back to be decided again on the new version. Nothing goes into the ledger (no
        effect was made), so the step's next command, under the same id, is executed."""
        log.warning(
            "command not executed, memory changed since its decision: %s",
            "; ".join(changed),
            extra={"run_id": command.run_id, "command_id": command.command_id},
        )
        result = ToolResult(
            event_id=stable_id(command.command_id, "stale-memory", command.decision_id),
            run_id=command.run_id,
            causation_id=command.event_id,
            command_id=command.command_id,
            tool=self.tool.name,
            step=command.step,
            operation=command.operation,
            status=ToolStatus.failed,
            output={"decision_id": command.decision_id, "changed": changed},
            error=f"decided on memory that changed before the call: {'; '.join(changed)}",
            error_kind=STALE_MEMORY,
            attempts=0,
        )
        encoded = codec.encode(result)
        await self._produce(self._results_topic, command.run_id.encode(), encoded)
        TOOL_CALLS.labels(self.tool.name, STALE_MEMORY).inc()

    async def _attempts(self, command: ToolCommand, recorded: int) -> ToolResult:
        """Call until success, a permanent error or the deadline. ``recorded`` attempts are already in
        the ledger, the last of them (counted by the claim) being the one about to be made."""
        started = time.monotonic()
        deadline = started + (command.deadline_at - datetime.now(UTC)).total_seconds()
        attempt = max(0, recorded - 1)
        error, kind = "", ""
        output: dict[str, Any] = {}
        status = ToolStatus.failed
        used = ModelUse()  # shared by the attempts: every model call made is counted
        while True:
            if self.stop_event.is_set():
                raise Stopping
            if not await self._rate_limited(command, deadline):
                error, kind = f"rate limit of {self.tool.name} would delay the call past the deadline", "deadline"
                break
            if not await self.breaker.acquire(deadline):
                error, kind = f"circuit open past the deadline after {attempt} attempt(s)", "deadline"
                break
            attempt += 1
            if attempt > recorded:
                await self.writer.attempt(command.command_id)
                recorded = attempt
            try:
                with (
                    self._http.lease() as http,
                    TOOL_CALL_SECONDS.labels(self.tool.name).time(),
                    tracing.span(f"tool {self.tool.name}", command.run_id, self._span_attributes(command, attempt)),
                ):
                    budget = ModelBudget(command.budget_tokens, command.budget_cost_usd)
                    ctx = CallContext(
                        http, command.run_id, command.command_id, attempt, used, budget, self._http.direct(http)
                    )
                    output = await self._call_once(command, ctx)
                await self.breaker.success()
                if self.health.is_down("sandbox"):
                    self.health.up("sandbox")
                status = ToolStatus.succeeded
                break
            except PermanentError as exc:
                await self.breaker.success()  # the API answered; it is up
                error, kind = str(exc), exc.kind
                break
            except RetryableError as exc:
                await self.breaker.failure()
                if outage(exc) == "sandbox":  # unreachable, not just an error answer
                    self.health.down("sandbox", exc)
                TOOL_CALLS.labels(self.tool.name, "retried").inc()
                delay = self.tool.retry.backoff(attempt, exc.retry_after)
                if self.tool.retry.exhausted(attempt):
                    error, kind = f"gave up after {attempt} attempts: {exc}", "retries-exhausted"
                    break
                if time.monotonic() + delay >= deadline:
                    error, kind = f"deadline passed after {attempt} attempt(s): {exc}", "deadline"
                    break
                log.info(
                    "retrying in %.2fs: %s",
                    delay,
                    exc,
                    extra={"run_id": command.run_id, "command_id": command.command_id, "attempt": attempt},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
            except Exception as exc:
                # A bug in the tool, not an outage: report it as the step's failure (the run ends
                # visibly) and keep the breaker honest, never leave the command hanging.
                await self.breaker.success()
                log.exception("tool %s raised", self.tool.name, extra={"run_id": command.run_id})
                error, kind = f"{type(exc).__name__}: {exc}", "tool-error"
                break
        return ToolResult(
            event_id=stable_id(command.command_id, "result"),
            run_id=command.run_id,
            causation_id=command.event_id,
            command_id=command.command_id,
            tool=self.tool.name,
            step=command.step,
            operation=command.operation,
            status=status,
            output=output,
            error=None if status is ToolStatus.succeeded else error,
            error_kind=None if status is ToolStatus.succeeded else kind,
            attempts=attempt,
            duration_ms=int((time.monotonic() - started) * 1000),
            model=used.model,
            prompt_tokens=used.prompt_tokens,
            completion_tokens=used.completion_tokens,
            cost_usd=used.cost_usd,
            model_context=used.context,
        )

    def _span_attributes(self, command: ToolCommand, attempt: int) -> dict[str, str | int]:
        if not tracing.enabled():
            return {}
        return {
            "streamagent.tool": self.tool.name,
            "streamagent.step": command.step,
            "streamagent.command_id": command.command_id,
            "streamagent.attempt": attempt,
        }

    async def _rate_limited(self, command: ToolCommand, deadline: float) -> bool:
        """Wait for this call's turn under the tool's rate limit; False if that turn comes after the
        deadline (the slot is given back, no call is made). Raises ``Stopping`` if the tool stops."""
        delay = self.limiter.reserve()
        if delay <= 0:
            return True
        if time.monotonic() + delay >= deadline:
            self.limiter.give_back()
            return False
        TOOL_CALLS.labels(self.tool.name, "throttled").inc()
        log.debug("rate limit: calling in %.3fs", delay, extra={"run_id": command.run_id})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
        if self.stop_event.is_set():
            raise Stopping
        return True

    async def _call_once(self, command: ToolCommand, ctx: CallContext) -> dict[str, Any]:
        timeout = self.timeout_s * 2  # the HTTP timeout fires first; this is a backstop
        try:
            if command.operation == "compensate":
                return await asyncio.wait_for(self.tool.compensate(command.arguments, ctx), timeout)
            args = self.tool.parse(command.arguments)
            result = await asyncio.wait_for(self.tool.call(args, ctx), timeout)
        except TimeoutError as exc:
            raise RetryableError(f"{self.tool.name} call exceeded {timeout:.1f}s") from exc
        return result.model_dump(mode="json")

    # -- producing -------------------------------------------------------------------------------
    def _produce_acked(self, topic: str, **kwargs: Any) -> asyncio.Future[None]:
        """Produce; the future settles when the broker acknowledges (or refuses) the message."""
        delivered: asyncio.Future[None] = self._loop.create_future()
        self.producer.produce(topic, on_delivery=functools.partial(self._reported, delivered), **kwargs)
        return delivered

    def _reported(self, delivered: asyncio.Future[None], err: Any, _msg: Any) -> None:
        self._reports.append((delivered, err))  # in the poll thread; handed over after the poll

    def _poll_producer(self) -> None:
        # Delivery reports fire from poll(); a thread keeps them flowing while the loop works, and
        # hands each poll's reports to the loop in one wake-up.
        while not self._stopping:
            self.producer.poll(0.05)
            self._hand_over()
        self.producer.flush(10)
        self._hand_over()

    def _hand_over(self) -> None:
        if self._reports:
            reports, self._reports = self._reports, []
            self._loop.call_soon_threadsafe(self._settle, reports)

    @staticmethod
    def _settle(reports: list[tuple[asyncio.Future[None], Any]]) -> None:
        for delivered, err in reports:
            if delivered.done():
                continue
            if err is not None:
                failed = DeliveryFailed(f"delivery failed: {err}")
                failed.__cause__ = KafkaException(err)  # so that ``errors.outage`` can class it
                delivered.set_exception(failed)
            else:
                delivered.set_result(None)

    async def _produce(self, topic: str, key: bytes, value: bytes) -> None:
        await self._produce_acked(topic, key=key, value=value, headers=self.signer.headers(value))

    async def _dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        """Dead-letter ``msg`` and wait for the broker's acknowledgement (re-sent if it is refused)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                self.dead_letters.send(msg, reason, detail)
                assert self._dlq_producer.last is not None
                await self._dlq_producer.last
                return
            except (DeliveryFailed, BufferError) as exc:
                delay = DEAD_LETTER_RETRY.backoff(attempt)
                log.error("dead letter not delivered (attempt %d), again in %.2fs: %r", attempt, delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
                if self.stop_event.is_set():
                    raise Stopping from exc


def ensure_command_topic(settings: Settings, name: str) -> None:
    """Create the tool's command topic if missing, so a new tool deploys without ``topics create``.

    Best effort: with the broker unreachable the runner still starts (and waits the outage out); the
    topic is then created by whoever comes first (``topics create`` or this tool's next start).
    """
    from streamagent.kafka import create_topics
    from streamagent.topics import TopicSpec, command_topic

    try:
        create_topics(settings, [TopicSpec(command_topic(name))])
    except Exception as exc:  # any admin failure: start anyway, as above
        log.warning("could not create the command topic of tool %s: %r", name, exc)


def run_tool(settings: Settings, tool: Tool[Any, Any]) -> None:
    # No key, no approval key or a malformed policy: refuse to start (one line from the CLI), before
    # touching Kafka.
    keys = role_keys(settings, tool_role(tool.name)).keys
    approval_keys = load_approval_keys(settings)
    policies = PolicyStore(settings.policies_dir, settings.policy_reload_s)
    ensure_command_topic(settings, tool.name)
    runner = ToolRunner(settings, tool, keys=keys, approval_keys=approval_keys, policies=policies)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runner.stop)
        await runner.run()

    asyncio.run(main())
