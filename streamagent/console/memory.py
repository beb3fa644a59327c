"""``streamagent memory put|get|history``: shared memory from the command line.

``put`` asks for a change as any upstream system does (to the intake topic for memory), then waits until
the memory processor has published the new version, or refused the write (a version conflict, a bad
field), and says which. ``get`` and ``history`` read the projection.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import psycopg
from pydantic import ValidationError

from streamagent import codec
from streamagent.config import Settings
from streamagent.console.errors import CliError
from streamagent.dlq_ops import read_dead_letters
from streamagent.errors import DecodeError
from streamagent.events import MemoryWrite
from streamagent.kafka import producer
from streamagent.topics import MEMORY_REQUESTS

# The dead-letter reasons under which a refused write can be found.
_REFUSALS = ("version-conflict", "invalid-memory-write", "unauthenticated", "invalid-event")


def assignments(items: list[str]) -> dict[str, Any]:
    """``field=text`` sets text; ``field:=JSON`` sets a number, a boolean, null, a list or an object."""
    fields: dict[str, Any] = {}
    for item in items:
        name, json_sep, raw = item.partition(":=")
        if not json_sep:
            name, sep, raw = item.partition("=")
            if not sep:
                raise CliError(f"--set {item!r}: write FIELD=TEXT or FIELD:=JSON", code=2)
            fields[name] = raw
            continue
        try:
            fields[name] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CliError(f"--set {item!r}: the value after := is not JSON ({exc.msg})", code=2) from None
    return fields


def build_write(
    entity: str,
    key: str,
    sets: dict[str, Any],
    unsets: list[str],
    delete: bool,
    expected_version: int | None,
    writer: str,
) -> MemoryWrite:
    if delete and (sets or unsets):
        raise CliError("--delete removes the whole entity: it goes with neither --set nor --unset", code=2)
    if not (delete or sets or unsets):
        raise CliError("nothing to change: give --set FIELD=VALUE, --unset FIELD or --delete", code=2)
    try:
        return MemoryWrite(
            entity=entity,
            key=key,
            set=sets,
            unset=unsets,
            delete=delete,
            expected_version=expected_version,
            writer=writer,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'write'}: {e['msg']}" for e in exc.errors())
        raise CliError(f"invalid memory write, nothing was sent: {problems}", code=2) from None


def send(settings: Settings, write: MemoryWrite) -> None:
    p = producer(settings)
    p.produce(settings.topic(MEMORY_REQUESTS), key=write.ref.encode(), value=codec.encode(write))
    if p.flush(30):
        raise CliError("the broker did not acknowledge the write")


def _version_of(settings: Settings, write_id: str) -> dict[str, Any] | None:
    with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT entity, key, version, fields, deleted, as_of, writer FROM memory_versions WHERE write_id=%s",
            (write_id,),
        ).fetchone()
    names = ("entity", "key", "version", "fields", "deleted", "as_of", "writer")
    return dict(zip(names, row, strict=True)) if row else None


def _refusal(settings: Settings, write_id: str) -> str | None:
    for letter in read_dead_letters(settings, timeout_s=5.0):
        if letter.reason not in _REFUSALS or not letter.value:
            continue
        try:
            refused = codec.decode(letter.value)
        except DecodeError:
            continue
        if isinstance(refused, MemoryWrite) and refused.write_id == write_id:
            return f"{letter.reason}: {letter.error}"
    return None


def wait_for(settings: Settings, write: MemoryWrite, timeout_s: float) -> dict[str, Any]:
    """The version the write became; ``CliError`` with the reason if it was refused or nothing came."""
    deadline = time.monotonic() + timeout_s
    next_dlq_check = time.monotonic() + 1.0
    while True:
        found = _version_of(settings, write.write_id)
        if found is not None:
            return found
        if time.monotonic() >= next_dlq_check:
            refused = _refusal(settings, write.write_id)
            if refused is not None:
                raise CliError(f"{write.ref}: the write was refused: {refused}")
            next_dlq_check = time.monotonic() + 2.0
        if time.monotonic() > deadline:
            raise CliError(
                f"{write.ref}: no version for write {write.write_id} within {timeout_s:g}s"
                " (are the intake, memory and projection processors running? see `up`'s terminal and its logs)"
            )
        time.sleep(0.1)  # polling the database, not synchronising a test


def latest(settings: Settings, entity: str, key: str) -> dict[str, Any] | None:
    rows = history(settings, entity, key)
    return rows[-1] if rows else None


def history(settings: Settings, entity: str, key: str) -> list[dict[str, Any]]:
    from streamagent.processors.projection.memory import history as read_history

    with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
        return read_history(conn, entity, key)


def describe(row: dict[str, Any], entity: str, key: str) -> str:
    state = "deleted" if row["deleted"] else json.dumps(row["fields"], sort_keys=True, ensure_ascii=False)
    return f"{entity}/{key} v{row['version']} as of {_when(row['as_of'])} by {row['writer']}: {state}"


def _when(moment: datetime) -> str:
    return moment.astimezone().isoformat(timespec="milliseconds")


def as_json(row: dict[str, Any], entity: str, key: str) -> str:
    return json.dumps(
        {"entity": entity, "key": key, **row, "as_of": row["as_of"].isoformat()}, sort_keys=True, ensure_ascii=False
    )
