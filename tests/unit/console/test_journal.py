"""The broker journal's file format and the wire decoding it relies on (no broker needed)."""

from __future__ import annotations

import struct
from pathlib import Path

from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from streamagent.console.devstack.broker import wire
from streamagent.console.devstack.broker.journal import Admin, JournalWriter, Offset, Records, scan
from streamagent.console.devstack.broker.restore import offsets_spanned, translate, without_producer


def _batch(producer_id: int = 42, count: int = 3) -> bytes:
    b = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=False,
        producer_id=producer_id,
        producer_epoch=0 if producer_id >= 0 else -1,
        base_sequence=7 if producer_id >= 0 else -1,
        batch_size=1 << 20,
    )
    for i in range(count):
        b.append(i, timestamp=1_700_000_000_000 + i, key=b"k%d" % i, value=b"v" * i, headers=[("h", b"x")])
    return bytes(b.build())


def _records(raw: bytes) -> list[tuple[object, ...]]:
    return [(r.offset, r.key, r.value, r.headers, r.timestamp) for r in DefaultRecordBatch(raw)]


ENTRIES = [
    Admin(wire.CREATE_TOPICS, 4, b"\x00\x01raw"),
    Records("agent.run.events", 3, 120, _batch()),
    Offset("streamagent.decision", "agent.run.state", 1, 77, None),
    Offset("g", "t", 0, 5, "meta"),
]


def test_entries_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    writer = JournalWriter(path)
    for entry in ENTRIES:
        writer.append(entry)
    writer.close()
    entries, clean = scan(path)
    assert entries == ENTRIES
    assert clean == path.stat().st_size


def test_a_torn_tail_is_dropped_and_the_writer_goes_on_after_the_last_whole_entry(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    writer = JournalWriter(path)
    for entry in ENTRIES:
        writer.append(entry)
    writer.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # the process died mid-write of the last entry
    assert scan(path)[0] == ENTRIES[:-1]
    writer = JournalWriter(path)  # truncates the torn bytes
    writer.append(ENTRIES[-1])
    writer.close()
    assert scan(path)[0] == ENTRIES


def test_a_corrupt_entry_ends_the_clean_prefix(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    writer = JournalWriter(path)
    for entry in ENTRIES:
        writer.append(entry)
    writer.close()
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF  # a flipped bit in the last entry's payload fails its CRC
    path.write_bytes(bytes(data))
    assert scan(path)[0] == ENTRIES[:-1]


def test_clearing_producer_ids_keeps_records_and_a_valid_crc() -> None:
    raw = _batch(producer_id=42)
    buf = bytearray(raw + raw)  # two batches back to back, as a produce request may carry
    assert wire.clear_producer_ids(buf, 0, len(buf))
    first = DefaultRecordBatch(bytes(buf[: len(raw)]))
    assert first.producer_id == -1 and first.base_sequence == -1 and first.validate_crc()
    assert _records(bytes(buf[: len(raw)])) == _records(raw)
    assert DefaultRecordBatch(bytes(buf[len(raw) :])).validate_crc()
    assert not wire.clear_producer_ids(buf, 0, len(buf))  # nothing left to clear
    assert without_producer(raw) == bytes(buf[: len(raw)])


def test_offsets_spanned_counts_every_batch() -> None:
    assert offsets_spanned(_batch(count=3) + _batch(count=5)) == 8


def test_produce_request_round_trip_gives_each_partition_its_records() -> None:
    raw = _batch()
    body = wire.encode_produce_request("t", 2, raw)
    request = wire.parse_produce_request(body, 3)
    assert request.acks == -1
    [part] = request.partitions
    assert (part.topic, part.partition, part.records) == ("t", 2, raw)
    assert body[part.position : part.position + len(raw)] == raw


def test_offset_commit_request_round_trip() -> None:
    offsets = [wire.CommittedOffset("g", "t", p, 10 * p, None) for p in range(3)]
    body = wire.encode_offset_commit_request("g", offsets)
    assert wire.parse_offset_commit_request(body, 2) == offsets


def test_flexible_request_header_skips_tagged_fields() -> None:
    frame = struct.pack(">hhi", wire.PRODUCE, 9, 77) + wire.string("client") + b"\x00" + b"BODY"
    header = wire.request_header(frame)
    assert (header.api_key, header.api_version, header.correlation_id, header.client_id) == (0, 9, 77, "client")
    assert frame[header.body_offset :] == b"BODY"


def test_committed_offsets_follow_their_records_across_a_hole() -> None:
    # Journal: a batch at 0-2, a hole at 3-4, a batch at 5-6 restored at 3-4; restored end 5.
    placed = [(0, 0, 3), (5, 3, 2)]
    assert [translate(o, placed, 5) for o in (0, 2, 3, 4, 5, 6, 7, 9)] == [0, 2, 3, 3, 3, 4, 5, 5]
    assert translate(4, [], 0) == 0  # a partition with nothing restored starts from its beginning
