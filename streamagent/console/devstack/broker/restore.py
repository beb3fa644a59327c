"""Put a journal back into an empty broker: topics, then every record batch, then group offsets.

Record batches are produced exactly as their producers sent them, each partition's in the order of
the base offsets the broker gave them the first time, and every answer is checked: the broker should
give each batch the same base offset again, so the restored log has the same offsets and bytes.

It may not, when the journal has a hole: the proxy journals a produce answer before the producer hears
it, but answers on different connections arrive in any order, so a cut can leave a later batch
journalled and an earlier one (never acknowledged) not. The later batches then move down. Nothing
acknowledged is lost, and committed offsets are translated to where their records now are (a group
that had read up to a moved batch resumes at its new place, not past it). The report's ``rewritten``
holds the journal in the new numbering, so the broker can replace its journal before new entries,
numbered the new way, are appended to it.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from streamagent.console.devstack.broker import wire
from streamagent.console.devstack.broker.journal import Admin, Entry, Offset, Records

log = logging.getLogger(__name__)

_WINDOW = 64  # produce requests in flight on the restore connection
_AUTO_CREATED_PARTITIONS = 4  # what the embedded broker gives a topic it creates on first use (BROKER-NOTES)
_CLIENT_ID = "streamagent-journal-restore"


class RestoreError(RuntimeError):
    """The broker did not take the journal back as it was."""


@dataclass
class RestoreReport:
    admin_requests: int = 0
    batches: int = 0
    records_bytes: int = 0
    offsets: int = 0
    duplicates: int = 0
    # The restored end of each partition (the next offset the broker will give).
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    gaps: list[str] = field(default_factory=list)
    # Per partition: (offset in the journal, offset restored at, offsets spanned), one per batch.
    placed: dict[tuple[str, int], list[tuple[int, int, int]]] = field(default_factory=dict)
    # The journal as restored (admin requests, batches at their restored offsets, last group offsets).
    rewritten: list[Entry] = field(default_factory=list)
    seconds: float = 0.0


class _Connection:
    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._next_id = 0
        self._buf = bytearray()

    def send(self, api_key: int, api_version: int, body: bytes) -> int:
        self._next_id += 1
        self.sock.sendall(wire.encode_request(api_key, api_version, self._next_id, _CLIENT_ID, body))
        return self._next_id

    def receive(self) -> tuple[int, memoryview]:
        (size,) = struct.unpack(">i", self._read(4))
        frame = self._read(size)
        (correlation_id,) = struct.unpack_from(">i", frame, 0)
        return correlation_id, memoryview(frame)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise RestoreError("the broker closed the restore connection")
            self._buf += chunk
        data, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return data

    def close(self) -> None:
        self.sock.close()


def restore(entries: list[Entry], host: str, port: int) -> RestoreReport:
    started = time.monotonic()
    report = RestoreReport()
    conn = _Connection(host, port)
    try:
        # Between two administration requests, records are replayed per partition in offset order
        # (the journal holds them in the order the broker's answers arrived, which can differ).
        segment: list[Records] = []
        ensured: set[str] = set()  # topics known to exist since the last deletion of them
        deleted: set[str] = set()  # topics deleted and not written since: their group offsets are gone too
        for entry in entries:
            if isinstance(entry, Records):
                segment.append(entry)
                deleted.discard(entry.topic)
            elif isinstance(entry, Admin):
                _replay_records(conn, segment, report, ensured)
                segment = []
                _replay_admin(conn, entry)
                if entry.api_key == wire.DELETE_TOPICS:
                    gone = set(wire.parse_delete_topics_request(entry.body, entry.api_version))
                    report.ends = {k: v for k, v in report.ends.items() if k[0] not in gone}
                    report.placed = {k: v for k, v in report.placed.items() if k[0] not in gone}
                    ensured -= gone
                    deleted |= gone
                report.rewritten.append(entry)
                report.admin_requests += 1
        _replay_records(conn, segment, report, ensured)
        offsets = [e for e in entries if isinstance(e, Offset) and e.topic not in deleted]
        report.offsets = _replay_offsets(conn, offsets, report)
    finally:
        conn.close()
    report.seconds = time.monotonic() - started
    return report


def offsets_spanned(blob: bytes) -> int:
    """How many offsets the record batches in ``blob`` take (each batch: last offset delta + 1)."""
    pos = total = 0
    while pos + 27 <= len(blob):
        (length,) = struct.unpack_from(">i", blob, pos + 8)
        (last_delta,) = struct.unpack_from(">i", blob, pos + 23)
        total += last_delta + 1
        pos += 12 + length
    return total


def without_producer(blob: bytes) -> bytes:
    """The batches with their idempotent-producer fields cleared (see ``wire.clear_producer_ids``). The
    proxy clears them before journalling; this covers a journal written before it did. A restarted
    broker knows no producer ids and refuses a batch that names one (UNKNOWN_PRODUCER_ID)."""
    out = bytearray(blob)
    wire.clear_producer_ids(out, 0, len(out))
    return bytes(out)


def _replay_admin(conn: _Connection, entry: Admin) -> None:
    conn.send(entry.api_key, entry.api_version, entry.body)
    conn.receive()  # an error (say, topic exists) is the answer it got the first time too


def _ensure_topics(conn: _Connection, batches: list[Records], ensured: set[str]) -> None:
    """Create the topics these batches go to, unless created already (the answer is then "exists").

    A topic the broker created by itself, on a client's first produce or metadata request, has no
    CreateTopics in the journal; producing to it on an empty broker would be refused, and committing a
    group offset for it too, so the broker would never start again (found 2026-12-07 with a tool's
    command topic). It gets the partitions the broker gives an auto-created topic, or as many as its
    records name."""
    wanted: dict[str, int] = {}
    for b in batches:
        if b.topic not in ensured:
            wanted[b.topic] = max(wanted.get(b.topic, _AUTO_CREATED_PARTITIONS), b.partition + 1)
    if wanted:
        conn.send(wire.CREATE_TOPICS, 4, wire.encode_create_topics_request(wanted))
        conn.receive()  # "already exists" for the topics the journal created itself: as wanted
        ensured.update(wanted)


def _replay_records(conn: _Connection, batches: list[Records], report: RestoreReport, ensured: set[str]) -> None:
    _ensure_topics(conn, batches, ensured)
    by_partition: dict[tuple[str, int], list[Records]] = defaultdict(list)
    for b in batches:
        by_partition[(b.topic, b.partition)].append(b)
    in_flight: deque[tuple[int, Records]] = deque()

    def settle_one() -> None:
        correlation_id, frame = conn.receive()
        sent_id, batch = in_flight.popleft()
        if correlation_id != sent_id:
            raise RestoreError(f"answer {correlation_id} to request {sent_id}")
        results = wire.parse_produce_response(frame[4:], 3)
        error, base = results.get((batch.topic, batch.partition), (-1, -1))
        if error != 0:
            raise RestoreError(f"{batch.topic}[{batch.partition}]: broker refused a batch (error {error})")
        if base != batch.base_offset:
            report.gaps.append(f"{batch.topic}[{batch.partition}] batch at {batch.base_offset} restored at {base}")
        span = offsets_spanned(batch.blob)
        key = (batch.topic, batch.partition)
        report.placed.setdefault(key, []).append((batch.base_offset, base, span))
        report.ends[key] = base + span
        report.rewritten.append(Records(batch.topic, batch.partition, base, batch.blob))

    for (topic, partition), items in by_partition.items():
        items.sort(key=lambda b: b.base_offset)
        placed = report.placed.get((topic, partition))
        next_offset = placed[-1][0] + placed[-1][2] if placed else 0  # in the journal's numbering
        for batch in items:
            if batch.base_offset < next_offset:
                report.duplicates += 1  # an idempotent retry the broker answered with the first offset
                continue
            next_offset = batch.base_offset + offsets_spanned(batch.blob)
            # Each partition's batches go one after another, all partitions share the window.
            body = wire.encode_produce_request(topic, partition, without_producer(batch.blob))
            in_flight.append((conn.send(wire.PRODUCE, 3, body), batch))
            report.batches += 1
            report.records_bytes += len(batch.blob)
            if len(in_flight) >= _WINDOW:
                settle_one()
    while in_flight:
        settle_one()


def translate(offset: int, placed: list[tuple[int, int, int]], end: int) -> int:
    """Where a committed offset (the next record a group will read, in the journal's numbering) is in
    the restored log: inside a batch, the same record; in a hole, the first record after it; past
    every batch, the restored end. A consumer can read a record a moment before its produce answer is
    journalled, so a commit can point past what was restored; it must not skip what comes next."""
    for old, new, span in placed:
        if offset < old:
            return new
        if offset < old + span:
            return new + (offset - old)
    return end


def _replay_offsets(conn: _Connection, offsets: list[Offset], report: RestoreReport) -> int:
    last: dict[tuple[str, str, int], Offset] = {}
    for o in offsets:
        last[(o.group, o.topic, o.partition)] = o
    by_group: dict[str, list[wire.CommittedOffset]] = defaultdict(list)
    for (group, topic, partition), o in last.items():
        key = (topic, partition)
        offset = translate(o.offset, report.placed.get(key, []), report.ends.get(key, 0))
        by_group[group].append(wire.CommittedOffset(group, topic, partition, offset, o.metadata))
        report.rewritten.append(Offset(group, topic, partition, offset, o.metadata))
    for group, items in by_group.items():
        conn.send(wire.OFFSET_COMMIT, 2, wire.encode_offset_commit_request(group, items))
        _, frame = conn.receive()
        errors = wire.parse_offset_commit_response(frame[4:], 2)
        bad = {k: v for k, v in errors.items() if v != 0}
        if bad:
            raise RestoreError(f"group {group}: broker refused restored offsets {bad}")
    return len(last)
