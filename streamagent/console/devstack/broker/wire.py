"""Just enough of the Kafka wire protocol to journal what a broker acknowledges.

The journal proxy forwards every request and response byte for byte; it decodes only the request
and response headers, and the bodies of the three kinds of request whose effect must survive the
broker: Produce (records), OffsetCommit (consumer-group offsets) and the topic administration
requests (kept raw). Field layouts follow the Kafka protocol guide
(https://kafka.apache.org/protocol); "flexible" versions use compact encodings and tagged fields.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PRODUCE = 0
FETCH = 1
OFFSET_COMMIT = 8
API_VERSIONS = 18
CREATE_TOPICS = 19
DELETE_TOPICS = 20
INCREMENTAL_ALTER_CONFIGS = 44

# First flexible version of each API we decode (the protocol guide's "flexibleVersions").
_FIRST_FLEXIBLE = {
    PRODUCE: 9,
    OFFSET_COMMIT: 8,
    CREATE_TOPICS: 5,
    DELETE_TOPICS: 4,
    INCREMENTAL_ALTER_CONFIGS: 1,
    API_VERSIONS: 3,
}
# Topic administration requests are replayed as they were sent, in journal order.
ADMIN_APIS = frozenset({CREATE_TOPICS, DELETE_TOPICS, INCREMENTAL_ALTER_CONFIGS})


class ProtocolError(ValueError):
    """Bytes that do not parse as the request or response they claim to be."""


def flexible(api_key: int, api_version: int) -> bool:
    first = _FIRST_FLEXIBLE.get(api_key)
    return first is not None and api_version >= first


class Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0) -> None:
        self.buf = memoryview(buf)
        self.pos = pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ProtocolError(f"read of {n} bytes past the end at {self.pos}/{len(self.buf)}")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def int8(self) -> int:
        return int(struct.unpack_from(">b", self._take(1))[0])

    def int16(self) -> int:
        return int(struct.unpack_from(">h", self._take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack_from(">i", self._take(4))[0])

    def int64(self) -> int:
        return int(struct.unpack_from(">q", self._take(8))[0])

    def uvarint(self) -> int:
        shift = value = 0
        while True:
            byte = self._take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ProtocolError("varint too long")

    def string(self, compact: bool) -> str:
        value = self.nullable_string(compact)
        if value is None:
            raise ProtocolError("null where a string is required")
        return value

    def nullable_string(self, compact: bool) -> str | None:
        n = self.uvarint() - 1 if compact else self.int16()
        if n < 0:
            return None
        return bytes(self._take(n)).decode("utf-8")

    def nullable_bytes(self, compact: bool) -> bytes | None:
        n = self.uvarint() - 1 if compact else self.int32()
        if n < 0:
            return None
        return bytes(self._take(n))

    def array_len(self, compact: bool) -> int:
        return self.uvarint() - 1 if compact else self.int32()

    def tagged_fields(self, compact: bool) -> None:
        if not compact:
            return
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self._take(self.uvarint())


def uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">h", len(raw)) + raw


def nullable_string(value: str | None) -> bytes:
    return struct.pack(">h", -1) if value is None else string(value)


# -- headers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    body_offset: int  # where the request body starts in the frame


def request_header(frame: bytes | memoryview) -> RequestHeader:
    r = Reader(frame)
    api_key, api_version, correlation_id = r.int16(), r.int16(), r.int32()
    client_id = r.nullable_string(compact=False)  # client_id is never compact, even in header v2
    # ApiVersions keeps header v1 for responses but requests switch to header v2 when flexible.
    r.tagged_fields(flexible(api_key, api_version))
    return RequestHeader(api_key, api_version, correlation_id, client_id, r.pos)


def encode_request(api_key: int, api_version: int, correlation_id: int, client_id: str, body: bytes) -> bytes:
    header = struct.pack(">hhi", api_key, api_version, correlation_id) + string(client_id)
    if flexible(api_key, api_version):
        header += b"\x00"  # no tagged fields
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def response_body_offset(api_key: int, api_version: int) -> int:
    """Bytes of response header before the body: the correlation id, and tagged fields when flexible
    (ApiVersions answers with header v0 at every version so that old clients can read it)."""
    return 4 + (1 if flexible(api_key, api_version) and api_key != API_VERSIONS else 0)


# -- Produce ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProducedPartition:
    topic: str
    partition: int
    records: bytes
    position: int = 0  # where ``records`` starts in the request body


@dataclass(frozen=True)
class ProduceRequest:
    acks: int
    partitions: list[ProducedPartition]


def parse_produce_request(body: memoryview | bytes, version: int) -> ProduceRequest:
    if version < 3 or version > 12:
        raise ProtocolError(f"Produce v{version} is not journaled (v3-v12 are)")
    compact = flexible(PRODUCE, version)
    r = Reader(body)
    r.nullable_string(compact)  # transactional_id
    acks = r.int16()
    r.int32()  # timeout
    parts: list[ProducedPartition] = []
    for _ in range(r.array_len(compact)):
        topic = r.string(compact)
        for _ in range(r.array_len(compact)):
            index = r.int32()
            n = r.uvarint() - 1 if compact else r.int32()
            position = r.pos
            records = bytes(r._take(n)) if n > 0 else b""
            r.tagged_fields(compact)
            if records:
                parts.append(ProducedPartition(topic, index, records, position))
        r.tagged_fields(compact)
    return ProduceRequest(acks, parts)


def parse_produce_response(body: memoryview | bytes, version: int) -> dict[tuple[str, int], tuple[int, int]]:
    """(topic, partition) -> (error code, base offset)."""
    compact = flexible(PRODUCE, version)
    r = Reader(body)
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for _ in range(r.array_len(compact)):
        topic = r.string(compact)
        for _ in range(r.array_len(compact)):
            index, error, base = r.int32(), r.int16(), r.int64()
            r.int64()  # log_append_time
            if version >= 5:
                r.int64()  # log_start_offset
            if version >= 8:
                for _ in range(r.array_len(compact)):
                    r.int32()
                    r.nullable_string(compact)
                    r.tagged_fields(compact)
                r.nullable_string(compact)
            r.tagged_fields(compact)
            out[(topic, index)] = (error, base)
        r.tagged_fields(compact)
    return out


def encode_produce_request(
    topic: str, partition: int, records: bytes, acks: int = -1, timeout_ms: int = 30_000
) -> bytes:
    """A Produce v3 body (the oldest version that carries record batches v2) for one partition."""
    return (
        nullable_string(None)
        + struct.pack(">hi", acks, timeout_ms)
        + struct.pack(">i", 1)
        + string(topic)
        + struct.pack(">i", 1)
        + struct.pack(">ii", partition, len(records))
        + records
    )


# -- OffsetCommit ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommittedOffset:
    group: str
    topic: str
    partition: int
    offset: int
    metadata: str | None


def parse_offset_commit_request(body: memoryview | bytes, version: int) -> list[CommittedOffset]:
    if version > 9:
        raise ProtocolError(f"OffsetCommit v{version} is not journaled (v0-v9 are)")
    compact = flexible(OFFSET_COMMIT, version)
    r = Reader(body)
    group = r.string(compact)
    if version >= 1:
        r.int32()  # generation
        r.string(compact)  # member id
    if version >= 7:
        r.nullable_string(compact)  # group instance id
    if 2 <= version <= 4:
        r.int64()  # retention
    out: list[CommittedOffset] = []
    for _ in range(r.array_len(compact)):
        topic = r.string(compact)
        for _ in range(r.array_len(compact)):
            index, offset = r.int32(), r.int64()
            if version >= 6:
                r.int32()  # leader epoch
            if version == 1:
                r.int64()  # commit timestamp
            metadata = r.nullable_string(compact)
            r.tagged_fields(compact)
            out.append(CommittedOffset(group, topic, index, offset, metadata))
        r.tagged_fields(compact)
    return out


def parse_offset_commit_response(body: memoryview | bytes, version: int) -> dict[tuple[str, int], int]:
    """(topic, partition) -> error code."""
    compact = flexible(OFFSET_COMMIT, version)
    r = Reader(body)
    if version >= 3:
        r.int32()  # throttle
    out: dict[tuple[str, int], int] = {}
    for _ in range(r.array_len(compact)):
        topic = r.string(compact)
        for _ in range(r.array_len(compact)):
            index, error = r.int32(), r.int16()
            r.tagged_fields(compact)
            out[(topic, index)] = error
        r.tagged_fields(compact)
    return out


def encode_offset_commit_request(group: str, offsets: list[CommittedOffset]) -> bytes:
    """An OffsetCommit v2 body with generation -1: a commit from outside the group's membership, as
    an admin tool makes it."""
    by_topic: dict[str, list[CommittedOffset]] = {}
    for o in offsets:
        by_topic.setdefault(o.topic, []).append(o)
    body = string(group) + struct.pack(">i", -1) + string("") + struct.pack(">q", -1)
    body += struct.pack(">i", len(by_topic))
    for topic, items in by_topic.items():
        body += string(topic) + struct.pack(">i", len(items))
        for o in items:
            body += struct.pack(">iq", o.partition, o.offset) + nullable_string(o.metadata)
    return body


def encode_create_topics_request(topics: dict[str, int], timeout_ms: int = 10_000) -> bytes:
    """A CreateTopics v4 body: each topic with its partition count, replication 1, no configs."""
    body = struct.pack(">i", len(topics))
    for name, partitions in topics.items():
        body += string(name) + struct.pack(">ihii", partitions, 1, 0, 0)
    return body + struct.pack(">ib", timeout_ms, 0)


def parse_delete_topics_request(body: memoryview | bytes, version: int) -> list[str]:
    compact = flexible(DELETE_TOPICS, version)
    r = Reader(body)
    names: list[str] = []
    for _ in range(r.array_len(compact)):
        if version >= 6:
            name = r.nullable_string(compact)
            r._take(16)  # topic id
            r.tagged_fields(compact)
        else:
            name = r.string(compact)
        if name is not None:
            names.append(name)
    return names


# -- record batches (magic v2) ---------------------------------------------------------------------
_BATCH_HEADER = 61  # bytes up to and including the record count
_TRANSACTIONAL = 0x10


def clear_producer_ids(buf: bytearray, start: int, end: int) -> bool:
    """Clear the idempotent-producer fields (producer id, epoch, base sequence := -1) of every
    non-transactional record batch in ``buf[start:end]`` and recompute its CRC-32C, in place.
    Returns whether anything changed. The records, timestamps and offset deltas are untouched."""
    from aiokafka.record.util import calc_crc32c  # C implementation, shipped with faust's client

    changed = False
    pos = start
    while pos + _BATCH_HEADER <= end:
        (length,) = struct.unpack_from(">i", buf, pos + 8)
        batch_end = pos + 12 + length
        (attributes,) = struct.unpack_from(">h", buf, pos + 21)
        (producer_id,) = struct.unpack_from(">q", buf, pos + 43)
        if producer_id != -1 and not attributes & _TRANSACTIONAL and batch_end <= end:
            struct.pack_into(">qhi", buf, pos + 43, -1, -1, -1)
            struct.pack_into(">I", buf, pos + 17, calc_crc32c(bytes(buf[pos + 21 : batch_end])))
            changed = True
        pos = batch_end
    return changed
