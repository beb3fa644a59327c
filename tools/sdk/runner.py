"""The tool runtime: consumes commands, executes each at most once, publishes the result.

Commands of one partition run concurrently, so a command that is backing off does not hold up
the others; commands of the same run still run one at a time, in order. An offset is committed
only when every command before it has its ledger row final and its result acknowledged by the
broker. A command seen again (redelivery, replay, restart) publishes its recorded result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
from confluent_kafka import KafkaError, Message, TopicPartition

from streamagent import codec, db
from streamagent.config import Settings
from streamagent.dlq import DeadLetterSink
from streamagent.errors import Rejected
from streamagent.events import ToolCommand, ToolResult, ToolStatus, stable_id
from streamagent.kafka import consumer as make_consumer
from streamagent.kafka import producer as make_producer
from streamagent.metrics import EVENTS_PROCESSED, TOOL_CALL_SECONDS, TOOL_CALLS
from streamagent.topics import TOOL_REGISTRY, TOOL_RESULTS, command_topic
from tools.sdk.breaker import CircuitBreaker
from tools.sdk.errors import PermanentError, RetryableError
from tools.sdk.ledger import Ledger
from tools.sdk.offsets import PartitionOffsets
from tools.sdk.tool import CallContext, Tool

log = logging.getLogger(__name__)


class _Stopping(Exception):
    """The tool is shutting down mid-retry: leave the command uncommitted for the next owner."""


class ToolRunner:
    def __init__(
        self,
        settings: Settings,
        tool: Tool[Any, Any],
        *,
        max_in_flight: int = 256,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.settings = settings
        self.tool = tool
        self.topic = settings.topic(command_topic(tool.name))
        self.max_in_flight = max_in_flight
        self.breaker = breaker or CircuitBreaker(tool.name)
        self.processor = f"tool.{tool.name}"
        self.stop_event = asyncio.Event()
        self.producer = make_producer(settings)
        self.dead_letters = DeadLetterSink(settings, self.producer, self.processor)
        self._kafka = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka")
        self._offsets: dict[tuple[str, int], PartitionOffsets] = defaultdict(PartitionOffsets)
        self._run_locks: dict[str, asyncio.Lock] = {}
        self._run_users: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False  # tells the producer-poll thread to flush and end

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        db.migrate(self.settings)
        self.ledger = await Ledger.open(self.settings)
        loop = asyncio.get_running_loop()
        consumer = make_consumer(self.settings, self.processor)
        consumer.subscribe([self.topic], on_revoke=self._revoked)
        self._consumer = consumer
        poller = loop.run_in_executor(None, self._poll_producer)
        await self._announce()
        timeout = httpx.Timeout(self.settings.tool_timeout_s)
        limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.settings.sandbox_url, timeout=timeout, limits=limits) as http:
            self.http = http
            log.info("tool consuming", extra={"tool": self.tool.name, "topic": self.topic})
            last_commit = time.monotonic()
            while not self.stop_event.is_set():
                if len(self._tasks) >= self.max_in_flight:
                    await asyncio.wait(self._tasks, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch = await loop.run_in_executor(self._kafka, consumer.consume, 100, 0.1)
                for msg in batch:
                    self._accept(msg)
                if time.monotonic() - last_commit > 0.2:
                    await self._commit()
                    last_commit = time.monotonic()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=10)
            await self._commit()
        self._stopping = True
        await poller
        await loop.run_in_executor(self._kafka, consumer.close)
        await self.ledger.close()
        log.info("tool stopped", extra={"tool": self.tool.name})

    def stop(self) -> None:
        self.stop_event.set()

    def _poll_producer(self) -> None:
        # Delivery callbacks fire from poll(); a thread keeps them flowing while the loop works.
        while not self._stopping:
            self.producer.poll(0.05)
        self.producer.flush(10)

    async def _announce(self) -> None:
        value = json.dumps(self.tool.announcement(), sort_keys=True).encode()
        await self._produce(self.settings.topic(TOOL_REGISTRY), self.tool.name.encode(), value)

    def _revoked(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # Commands of revoked partitions may still finish here; the new owner finds them in the
        # ledger (or re-runs them under the same idempotency key), so nothing runs twice.
        for tp in partitions:
            self._offsets.pop((tp.topic, tp.partition), None)

    async def _commit(self) -> None:
        offsets = []
        for (topic, partition), tracker in self._offsets.items():
            offset = tracker.committable()
            if offset is not None:
                offsets.append(TopicPartition(topic, partition, offset))
                tracker.committed = offset
        if offsets:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(
                    self._kafka, lambda: self._consumer.commit(offsets=offsets, asynchronous=False)
                )
            except Exception as exc:  # a rebalance can refuse a commit; the work is redone, safely
                log.warning("commit failed: %r", exc)

    # -- one command -----------------------------------------------------------------------------
    def _accept(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
            return
        EVENTS_PROCESSED.labels(self.processor, msg.topic()).inc()
        tracker = self._offsets[(msg.topic(), msg.partition())]
        tracker.received(msg.offset())
        task = asyncio.create_task(self._handle(msg, tracker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Message, tracker: PartitionOffsets) -> None:
        try:
            command = self._decode(msg)
            await self._check_known(command)
            await self._in_run_order(command)
        except _Stopping:
            return  # not done: its offset stays uncommitted
        except Rejected as exc:
            self.dead_letters.send(msg, exc.reason, exc.detail)
            await self._flush()
        except Exception as exc:  # one bad command must never stop the tool
            log.exception("tool failed on %s[%s]@%s", msg.topic(), msg.partition(), msg.offset())
            self.dead_letters.send(msg, "processing-error", repr(exc))
            await self._flush()
        tracker.done(msg.offset())

    async def _in_run_order(self, command: ToolCommand) -> None:
        """Commands of one run execute one at a time, in arrival order; other runs are not held up."""
        run_id = command.run_id
        lock = self._run_locks.setdefault(run_id, asyncio.Lock())
        self._run_users[run_id] += 1
        try:
            async with lock:
                await self._execute(command)
        finally:
            self._run_users[run_id] -= 1
            if self._run_users[run_id] == 0:
                del self._run_users[run_id]
                del self._run_locks[run_id]

    def _decode(self, msg: Message) -> ToolCommand:
        command = codec.decode(msg.value(), self.settings.max_event_bytes)  # DecodeError is a Rejected
        if not isinstance(command, ToolCommand) or command.tool != self.tool.name:
            raise Rejected("unexpected-event", f"{type(command).__name__} is not a {self.tool.name} command")
        return command

    async def _check_known(self, command: ToolCommand) -> None:
        # The decision is stored before its command is produced, so a command without one was not
        # issued by the decision layer (a stale or forged message): refuse it rather than act.
        if not await self.ledger.decision_known(command.decision_id):
            raise Rejected("unknown-run", f"no recorded decision {command.decision_id} for run {command.run_id}")

    async def _execute(self, command: ToolCommand) -> None:
        entry = await self.ledger.begin(command.command_id, self.tool.name, command.run_id, command.step)
        if entry.final and entry.result_event is not None:
            TOOL_CALLS.labels(self.tool.name, "deduplicated").inc()
            log.info(
                "command already done, republishing its result",
                extra={"run_id": command.run_id, "command_id": command.command_id},
            )
            await self._produce(self.settings.topic(TOOL_RESULTS), command.run_id.encode(), entry.result_event)
            return
        result = await self._attempts(command, entry.attempts)
        encoded = codec.encode(result)
        await self.ledger.finish(command.command_id, result.status.value, encoded)
        await self._produce(self.settings.topic(TOOL_RESULTS), command.run_id.encode(), encoded)
        TOOL_CALLS.labels(self.tool.name, result.status.value).inc()

    async def _attempts(self, command: ToolCommand, previous_attempts: int) -> ToolResult:
        started = time.monotonic()
        deadline = started + (command.deadline_at - datetime.now(UTC)).total_seconds()
        attempt = previous_attempts
        error, kind = "", ""
        output: dict[str, Any] = {}
        status = ToolStatus.failed
        while True:
            if self.stop_event.is_set():
                raise _Stopping
            if not await self.breaker.acquire(deadline):
                error, kind = f"circuit open past the deadline after {attempt} attempt(s)", "deadline"
                break
            attempt += 1
            await self.ledger.attempt(command.command_id)
            ctx = CallContext(self.http, command.run_id, command.command_id, attempt)
            try:
                with TOOL_CALL_SECONDS.labels(self.tool.name).time():
                    output = await self._call_once(command, ctx)
                await self.breaker.success()
                status = ToolStatus.succeeded
                break
            except PermanentError as exc:
                await self.breaker.success()  # the API answered; it is up
                error, kind = str(exc), "permanent"
                break
            except RetryableError as exc:
                await self.breaker.failure()
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
        )

    async def _call_once(self, command: ToolCommand, ctx: CallContext) -> dict[str, Any]:
        timeout = self.settings.tool_timeout_s * 2  # the HTTP timeout fires first; this is a backstop
        try:
            if command.operation == "compensate":
                return await asyncio.wait_for(self.tool.compensate(command.arguments, ctx), timeout)
            args = self.tool.parse(command.arguments)
            result = await asyncio.wait_for(self.tool.call(args, ctx), timeout)
        except TimeoutError as exc:
            raise RetryableError(f"{self.tool.name} call exceeded {timeout:.1f}s") from exc
        return result.model_dump(mode="json")

    # -- producing -------------------------------------------------------------------------------
    async def _produce(self, topic: str, key: bytes, value: bytes) -> None:
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: Any, _msg: Any) -> None:
            def settle() -> None:
                if delivered.done():
                    return
                if err is not None:
                    delivered.set_exception(RuntimeError(f"delivery to {topic} failed: {err}"))
                else:
                    delivered.set_result(None)

            loop.call_soon_threadsafe(settle)

        self.producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        await delivered

    async def _flush(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.producer.flush, 10)


def run_tool(settings: Settings, tool: Tool[Any, Any]) -> None:
    runner = ToolRunner(settings, tool)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runner.stop)
        await runner.run()

    asyncio.run(main())
