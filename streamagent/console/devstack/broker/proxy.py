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
from typing import cast

from streamagent.console.devstack.broker import wire
from streamagent.console.devstack.broker.journal import Admin, Entry, JournalWriter, Offset, Records

log = logging.getLogger(__name__)

_SIZE = struct.Struct(">i")
_KEY = struct.Struct(">h")
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
    """Appends entries; many answers wait on one write + fsync, done off the event loop.

    ``barrier()`` returns a future that resolves once everything appended so far is durable."""

    def __init__(self, journal: JournalWriter) -> None:
        self.journal = journal
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="journal-sync")
        self.syncs = 0
        self.failed = asyncio.Event()  # the journal cannot be written: the broker must stop

    def append(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.journal.append(entry)

    def barrier(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        return waiter

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiters:
                waiters, self._waiters = self._waiters, []
                data = self.journal.take()  # on the loop thread, where entries are appended
                try:
                    await loop.run_in_executor(self._executor, self.journal.write, data)
                except OSError as exc:  # disk full or gone: no client may be told "acknowledged"
                    log.critical("journal write failed, the broker stops: %s", exc)
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                    self.failed.set()
                    return
                self.syncs += 1
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
        finally:
            self._flushing = False

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.journal.close()


def _frames(buf: bytearray) -> list[bytes]:
    """Cut every whole ``size | frame`` off the front of ``buf``; a partial frame stays."""
    out: list[bytes] = []
    pos = 0
    while len(buf) - pos >= 4:
        (size,) = _SIZE.unpack_from(buf, pos)
        if size <= 0 or size > _MAX_FRAME:
            raise ConnectionError(f"bad frame size {size}")
        if len(buf) - pos - 4 < size:
            break
        out.append(bytes(buf[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    if pos:
        del buf[:pos]
    return out


class _Link:
    """One client connection and its own upstream connection to the broker.

    Requests go up as they arrive. Answers come back in request order (Kafka's rule per connection);
    an answer that made journal entries is held, with every answer behind it, until those entries
    are durable."""

    def __init__(self, proxy: JournalProxy) -> None:
        self.proxy = proxy
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []  # requests that arrived before the upstream connected
        self.requests = bytearray()
        self.answers = bytearray()
        self.pending: deque[_Pending] = deque()
        self.held: deque[tuple[bytes, asyncio.Future[None] | None]] = deque()
        self.closed = False

    # client side
    def client_data(self, data: bytes) -> None:
        self.requests += data
        try:
            frames = _frames(self.requests)
        except ConnectionError as exc:
            log.warning("client sent garbage: %s", exc)
            self.close()
            return
        out = []
        for frame in frames:
            item, frame = _describe(frame)
            key = _KEY.unpack_from(frame, 0)[0]
            self.proxy.requests[key] = self.proxy.requests.get(key, 0) + 1
            if item is not None:
                self.pending.append(item)
            out.append(_SIZE.pack(len(frame)) + frame)
        if self.upstream is None:
            self.early += out
        else:
            self.upstream.writelines(out)

    def upstream_connected(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        if self.closed:
            transport.close()
            return
        if self.early:
            transport.writelines(self.early)
            self.early = []

    # broker side
    def upstream_data(self, data: bytes) -> None:
        self.answers += data
        try:
            frames = _frames(self.answers)
        except ConnectionError as exc:
            log.error("broker sent garbage: %s", exc)
            self.close()
            return
        for frame in frames:
            (correlation_id,) = _SIZE.unpack_from(frame, 0)
            item = self.pending.popleft() if self.pending else None
            if item is not None and item.correlation_id != correlation_id:
                log.error("answer %s does not match request %s", correlation_id, item.correlation_id)
                self.close()
                return
            barrier = None
            if item is not None and item.api_key != -1:
                body = memoryview(frame)[wire.response_body_offset(item.api_key, item.api_version) :]
                entries = _entries(item, body)
                if entries:
                    self.proxy.commit.append(entries)
                    barrier = self.proxy.commit.barrier()
                    barrier.add_done_callback(self._release)
            self.held.append((frame, barrier))
        self._release()

    def _release(self, _: object = None) -> None:
        out = []
        while self.held:
            frame, barrier = self.held[0]
            if barrier is not None:
                if not barrier.done():
                    break
                if barrier.exception() is not None:
                    self.close()  # never acknowledge what is not in the journal
                    return
            self.held.popleft()
            out.append(_SIZE.pack(len(frame)) + frame)
        if out and self.client is not None and not self.closed:
            self.client.writelines(out)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for transport in (self.client, self.upstream):
            if transport is not None:
                transport.close()
        self.proxy.links.discard(self)


class _ClientSide(asyncio.Protocol):
    def __init__(self, proxy: JournalProxy) -> None:
        self.link = _Link(proxy)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        transport.set_write_buffer_limits(high=4 << 20)
        self.link.client = transport
        self.link.proxy.links.add(self.link)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: _UpstreamSide(self.link), *self.link.proxy.upstream))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> None:
        if task.cancelled() or task.exception() is not None:
            log.warning("broker unreachable: %r", None if task.cancelled() else task.exception())
            self.link.close()

    def data_received(self, data: bytes) -> None:
        self.link.client_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()

    # Back-pressure: a slow client stops us reading the broker's answers, and the reverse.
    def pause_writing(self) -> None:
        if self.link.upstream is not None:
            self.link.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.link.upstream is not None:
            self.link.upstream.resume_reading()


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, link: _Link) -> None:
        self.link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=4 << 20)
        self.link.upstream_connected(transport)

    def data_received(self, data: bytes) -> None:
        self.link.upstream_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()

    def pause_writing(self) -> None:
        if self.link.client is not None:
            self.link.client.pause_reading()

    def resume_writing(self) -> None:
        if self.link.client is not None:
            self.link.client.resume_reading()


class JournalProxy:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], commit: GroupCommit) -> None:
        self.listen = listen
        self.upstream = upstream
        self.commit = commit
        self._server: asyncio.AbstractServer | None = None
        self.links: set[_Link] = set()
        self.requests: dict[int, int] = {}  # api key -> requests forwarded

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientSide(self), *self.listen, reuse_address=True)

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    def close(self) -> None:
        for link in list(self.links):
            link.close()


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
