"""The broker journal: an append-only file of what the broker acknowledged.

Three kinds of entry, each framed as ``length u32 | crc32 u32 | kind u8 | payload``:

- ``records``: a record-batch blob exactly as the producer sent it, with its topic, partition and
  the base offset the broker gave it;
- ``offset``: one committed consumer-group offset;
- ``admin``: a topic administration request (create, delete, alter configs), raw.

A torn tail (the process died mid-write) fails its length or checksum; reading stops there and the
writer truncates it away on open, so the file is always a clean sequence of whole entries.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_FRAME = struct.Struct(">II")  # payload length (kind byte included), crc32 of kind + payload
RECORDS, OFFSET, ADMIN = 1, 2, 3
JOURNAL_FILE = "journal.log"
LOCK_FILE = "journal.lock"
# How a broker refused for a held journal says so (the first words of its one line): the launcher
# (``embedded.EmbeddedBroker``) recognises it in the broker's log.
IN_USE = "journal in use:"


class JournalInUse(RuntimeError):
    """Another live process holds the journal's lock."""


def lock_journal(data_dir: Path) -> int:
    """Take the journal's lock for the life of this process (the returned descriptor is never closed):
    an exclusive ``flock`` on ``<data_dir>/journal.lock``. Two brokers on one journal would each append
    their own offsets and restore the other's half-written history: the second is refused, with the
    holder's pid. The kernel drops the lock when its holder dies, however it dies, so a lock file left
    by ``kill -9`` never blocks a restart; the file is never deleted (deleting a lock file lets two
    processes lock two different files of one name)."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode().strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        raise JournalInUse(
            f"{IN_USE} {data_dir / JOURNAL_FILE} is held by another broker (pid {holder}); two brokers on one"
            f" journal would corrupt it: stop that one first (`kill {holder}`)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(frozen=True)
class Records:
    topic: str
    partition: int
    base_offset: int
    blob: bytes


@dataclass(frozen=True)
class Offset:
    group: str
    topic: str
    partition: int
    offset: int
    metadata: str | None


@dataclass(frozen=True)
class Admin:
    api_key: int
    api_version: int
    body: bytes


Entry = Records | Offset | Admin


def _str(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">i", -1)
    raw = value.encode("utf-8")
    return struct.pack(">i", len(raw)) + raw


def _read_str(buf: memoryview, pos: int) -> tuple[str | None, int]:
    (n,) = struct.unpack_from(">i", buf, pos)
    pos += 4
    if n < 0:
        return None, pos
    return bytes(buf[pos : pos + n]).decode("utf-8"), pos + n


def encode(entry: Entry) -> bytes:
    if isinstance(entry, Records):
        payload = (
            bytes([RECORDS])
            + _str(entry.topic)
            + struct.pack(">iqi", entry.partition, entry.base_offset, len(entry.blob))
            + entry.blob
        )
    elif isinstance(entry, Offset):
        payload = (
            bytes([OFFSET])
            + _str(entry.group)
            + _str(entry.topic)
            + struct.pack(">iq", entry.partition, entry.offset)
            + _str(entry.metadata)
        )
    else:
        payload = bytes([ADMIN]) + struct.pack(">hhi", entry.api_key, entry.api_version, len(entry.body)) + entry.body
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: memoryview) -> Entry:
    kind = payload[0]
    if kind == RECORDS:
        topic, pos = _read_str(payload, 1)
        partition, base, n = struct.unpack_from(">iqi", payload, pos)
        pos += 16
        return Records(topic or "", partition, base, bytes(payload[pos : pos + n]))
    if kind == OFFSET:
        group, pos = _read_str(payload, 1)
        topic, pos = _read_str(payload, pos)
        partition, offset = struct.unpack_from(">iq", payload, pos)
        metadata, _ = _read_str(payload, pos + 12)
        return Offset(group or "", topic or "", partition, offset, metadata)
    if kind == ADMIN:
        api_key, api_version, n = struct.unpack_from(">hhi", payload, 1)
        return Admin(api_key, api_version, bytes(payload[9 : 9 + n]))
    raise ValueError(f"unknown journal entry kind {kind}")


def scan(path: Path) -> tuple[list[Entry], int]:
    """Every whole entry in the file, and the length of the clean prefix they fill."""
    if not path.exists():
        return [], 0
    data = memoryview(path.read_bytes())
    entries: list[Entry] = []
    pos = 0
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if length == 0 or end > len(data):
            break
        payload = data[pos + _FRAME.size : end]
        if zlib.crc32(payload) != crc:
            break
        entries.append(_decode(payload))
        pos = end
    return entries, pos


def iter_entries(path: Path) -> Iterator[Entry]:
    yield from scan(path)[0]


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def rewrite(path: Path, entries: list[Entry], *, fsync: bool = True) -> int:
    """Replace the journal by ``entries`` atomically (a new file renamed over the old); its length."""
    tmp = path.with_name(path.name + ".rewrite")
    data = b"".join(encode(e) for e in entries)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:  # the rename itself must survive a power cut
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return len(data)


class JournalWriter:
    """Appends entries; ``sync()`` makes what was appended durable (one fsync for many entries)."""

    def __init__(self, path: Path, *, clean_length: int | None = None, fsync: bool = True) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if clean_length is None:
            clean_length = scan(path)[1]
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, clean_length)  # drop a torn tail
        os.lseek(self._fd, clean_length, os.SEEK_SET)
        self._fsync = fsync
        self._pending = bytearray()
        self.bytes_written = clean_length
        self.entries_written = 0

    def append(self, entry: Entry) -> None:
        self._pending += encode(entry)
        self.entries_written += 1

    def take(self) -> bytes:
        """What was appended since the last take, to hand to ``write`` (on another thread)."""
        data, self._pending = bytes(self._pending), bytearray()
        return data

    def write(self, data: bytes) -> None:
        """Write ``data`` at the end; fsync it when asked to survive a power cut, not just a kill."""
        if not data:
            return
        _write_all(self._fd, data)
        self.bytes_written += len(data)
        if self._fsync:
            os.fdatasync(self._fd)

    def sync(self) -> None:
        self.write(self.take())

    def close(self) -> None:
        self.sync()
        os.close(self._fd)
