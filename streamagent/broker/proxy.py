"""A Kafka-protocol proxy that journals what the broker acknowledges before the client hears of it.

Every client connection gets its own upstream connection to the broker; bytes pass through
unchanged. Kafka answers the requests of one connection in order, so a FIFO of what each request
was is enough to pair responses with requests. For a Produce, an OffsetCommit or a topic
administration request, the entries it made are appended to the journal when the broker's answer
arrives, and the answer is held until the journal has them (group commit: one write and one fsync
for everything that arrived meanwhile). So a producer is told "acknowledged" only for records that
are in the journal; a record whose produce was never acknowledged may be missing after a crash,
which is what Kafka promises too.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from streamagent.broker import wire
from streamagent.broker.journal import Admin, Entry, JournalWriter, Offset, Records

log = logging.getLogger(__name__)

_SIZE = struct.Struct(">i")
_MAX_FRAME = 256 * 1024 * 1024


@dataclass
class _Pending:
    correlation_id: int
    api_key: int
    api_version: int
    produce: wire.ProduceRequest | None = None
    commits: list[wire.CommittedOffset] | None = None
    admin_body: bytes | None = None


class GroupCommit:
    """Appends entries and lets many waiters share one write + fsync, done off the event loop."""

    def __init__(self, journal: JournalWriter) -> None:
        self.journal = journal
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="journal-sync")
        self.syncs = 0

    def append(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.journal.append(entry)

    async def durable(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        await waiter

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiters:
                waiters, self._waiters = self._waiters, []
                try:
                    await loop.run_in_executor(self._executor, self.journal.sync)
                except OSError as exc:  # disk full or gone: the client must not be told "acknowledged"
                    for w in waiters:
                        w.set_exception(exc)
                    continue
                self.syncs += 1
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
        finally:
            self._flushing = False

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.journal.close()


class JournalProxy:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], commit: GroupCommit) -> None:
        self.listen = listen
        self.upstream = upstream
        self.commit = commit
        self._server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.requests: dict[int, int] = {}  # api key -> requests forwarded

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, *self.listen, reuse_address=True)

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.warning("broker unreachable: %s", exc)
            c_writer.close()
            return
        pending: deque[_Pending] = deque()
        tasks = [
            asyncio.create_task(self._requests(c_reader, u_writer, pending)),
            asyncio.create_task(self._responses(u_reader, c_writer, pending)),
        ]
        try:
            done, rest = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in rest:
                task.cancel()
            for task in done:
                if task.cancelled():
                    continue
                if task.exception() is not None and not isinstance(
                    task.exception(), (asyncio.IncompleteReadError, ConnectionError)
                ):
                    log.error("proxy connection failed: %r", task.exception())
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        finally:
            for w in (c_writer, u_writer):
                w.close()
            self.connections -= 1

    async def _requests(
        self, c_reader: asyncio.StreamReader, u_writer: asyncio.StreamWriter, pending: deque[_Pending]
    ) -> None:
        while True:
            size_bytes = await c_reader.readexactly(4)
            (size,) = _SIZE.unpack(size_bytes)
            if size <= 0 or size > _MAX_FRAME:
                raise ConnectionError(f"bad request frame size {size}")
            frame = await c_reader.readexactly(size)
            item, frame = _describe(frame)
            key = struct.unpack_from(">h", frame, 0)[0]
            self.requests[key] = self.requests.get(key, 0) + 1
            if item is not None:
                pending.append(item)
            u_writer.write(size_bytes + frame)
            await u_writer.drain()

    async def _responses(
        self, u_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter, pending: deque[_Pending]
    ) -> None:
        while True:
            size_bytes = await u_reader.readexactly(4)
            (size,) = _SIZE.unpack(size_bytes)
            frame = await u_reader.readexactly(size)
            (correlation_id,) = _SIZE.unpack_from(frame, 0)
            item = pending.popleft() if pending else None
            if item is not None and item.correlation_id != correlation_id:
                raise ConnectionError(f"response {correlation_id} does not answer request {item.correlation_id}")
            if item is not None and item.api_key != -1:
                entries = _entries(item, memoryview(frame)[wire.response_body_offset(item.api_key, item.api_version) :])
                if entries:
                    self.commit.append(entries)
                    await self.commit.durable()
            c_writer.write(size_bytes + frame)
            await c_writer.drain()


def _describe(frame: bytes) -> tuple[_Pending | None, bytes]:
    """What the proxy must remember about a request to journal its answer (None if no answer comes),
    and the frame to forward."""
    header = wire.request_header(frame)
    item = _Pending(header.correlation_id, -1, header.api_version)
    body = memoryview(frame)[header.body_offset :]
    try:
        if header.api_key == wire.PRODUCE:
            request = wire.parse_produce_request(body, header.api_version)
            frame, request = _without_producer_ids(frame, header.body_offset, request)
            if request.acks == 0:
                log.warning("acks=0 produce is not journaled (no acknowledgement to hold)")
                return None, frame
            item.api_key, item.produce = wire.PRODUCE, request
        elif header.api_key == wire.OFFSET_COMMIT:
            item.api_key, item.commits = wire.OFFSET_COMMIT, wire.parse_offset_commit_request(body, header.api_version)
        elif header.api_key in wire.ADMIN_APIS:
            item.api_key, item.admin_body = header.api_key, bytes(body)
    except wire.ProtocolError as exc:
        # Forwarded anyway: the broker is the judge of a request; only its journaling is lost.
        log.error("could not decode api %s v%s for the journal: %s", header.api_key, header.api_version, exc)
    return item, frame


def _without_producer_ids(
    frame: bytes, body_offset: int, request: wire.ProduceRequest
) -> tuple[bytes, wire.ProduceRequest]:
    """Idempotent producers' batches, made plain. A broker restarted from the journal has never
    heard of the producer ids the running clients got from its predecessor and would refuse every
    batch of theirs (UNKNOWN_PRODUCER_ID) until each client is restarted. Plain batches are accepted
    by any broker generation; the client still orders its own retries, and a retry that duplicates a
    record is absorbed downstream, where every event is deduplicated by its id."""
    buf = bytearray(frame)
    changed = False
    for part in request.partitions:
        start = body_offset + part.position
        changed |= wire.clear_producer_ids(buf, start, start + len(part.records))
    if not changed:
        return frame, request
    parts = [
        wire.ProducedPartition(
            p.topic,
            p.partition,
            bytes(buf[body_offset + p.position : body_offset + p.position + len(p.records)]),
            p.position,
        )
        for p in request.partitions
    ]
    return bytes(buf), wire.ProduceRequest(request.acks, parts)


def _entries(item: _Pending, body: memoryview) -> list[Entry]:
    if item.produce is not None:
        results = wire.parse_produce_response(body, item.api_version)
        out: list[Entry] = []
        for part in item.produce.partitions:
            error, base = results.get((part.topic, part.partition), (-1, -1))
            if error == 0 and base >= 0:
                out.append(Records(part.topic, part.partition, base, part.records))
        return out
    if item.commits is not None:
        errors = wire.parse_offset_commit_response(body, item.api_version)
        return [
            Offset(c.group, c.topic, c.partition, c.offset, c.metadata)
            for c in item.commits
            if errors.get((c.topic, c.partition), -1) == 0
        ]
    if item.admin_body is not None:
        return [Admin(item.api_key, item.api_version, item.admin_body)]
    return []
