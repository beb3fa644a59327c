"""Avro single-object encoding of every event, with no schema registry needed.

Wire format (Avro spec, "Single object encoding"): ``C3 01`` + the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's canonical form + the Avro binary body. Every
schema under ``schemas/`` (current and ``history/``) is known by fingerprint, so a reader can
decode an event written with an older schema and resolve it to the current one.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema
from pydantic import BaseModel, ValidationError

from streamagent.errors import DecodeError
from streamagent.events import ALL_MODELS, DecisionRecorded, StateSnapshot

__all__ = ["DecodeError", "decode", "encode", "registry"]

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


@dataclass(frozen=True)
class SchemaEntry:
    name: str
    fingerprint: bytes
    parsed: Any
    current: bool


def fingerprint(parsed: Any) -> bytes:
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


class SchemaRegistry:
    """All schemas of ``schemas/``, by fingerprint and by record name."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.by_fingerprint: dict[bytes, SchemaEntry] = {}
        self.current: dict[str, SchemaEntry] = {}
        for path in sorted(schema_dir.rglob("*.avsc")):
            raw = json.loads(path.read_text())
            # Fingerprint the plain parse; read and write with the hinted one, which fastavro marks as
            # parsed so it does not parse the schema again on every call (twice as fast per event).
            plain = fastavro.parse_schema(raw, _write_hint=False)
            parsed = fastavro.parse_schema(raw)
            is_current = path.parent == schema_dir
            entry = SchemaEntry(plain["name"], fingerprint(plain), parsed, is_current)
            self.by_fingerprint[entry.fingerprint] = entry
            if is_current:
                self.current[entry.name] = entry
        missing = [m.SCHEMA_NAME for m in ALL_MODELS if m.SCHEMA_NAME not in self.current]  # type: ignore[attr-defined]
        if missing:
            raise RuntimeError(f"no schema in {schema_dir} for {missing}")


_MODELS: dict[str, type[BaseModel]] = {m.SCHEMA_NAME: m for m in ALL_MODELS}  # type: ignore[attr-defined]


@lru_cache(maxsize=1)
def registry() -> SchemaRegistry:
    return SchemaRegistry()


def _to_record(model: BaseModel) -> dict[str, Any]:
    record = model.model_dump(mode="python")
    for name in getattr(model, "JSON_FIELDS", ()):
        record[name] = json.dumps(record[name], sort_keys=True, default=str)
    if isinstance(model, StateSnapshot):
        for step in record["steps"]:
            step["output"] = json.dumps(step["output"], sort_keys=True, default=str)
    if isinstance(model, DecisionRecorded):
        for dispatch in record["parallel"]:
            dispatch["arguments"] = json.dumps(dispatch["arguments"], sort_keys=True, default=str)
    for key, value in record.items():
        if hasattr(value, "value") and not isinstance(value, dict):  # StrEnum -> its symbol
            record[key] = value.value
    return record


def _from_record(model: type[BaseModel], record: dict[str, Any]) -> BaseModel:
    for name in getattr(model, "JSON_FIELDS", ()):
        if isinstance(record.get(name), str):
            record[name] = json.loads(record[name])
    if model is StateSnapshot:
        for step in record["steps"]:
            step["output"] = json.loads(step["output"])
    if model is DecisionRecorded:
        for dispatch in record.get("parallel") or ():
            dispatch["arguments"] = json.loads(dispatch["arguments"])
    return model.model_validate(record)


def encode(model: BaseModel, *, schema: SchemaEntry | None = None) -> bytes:
    """Encode with the current schema of the model's type (or an explicit, e.g. older, one)."""
    entry = schema or registry().current[model.SCHEMA_NAME]  # type: ignore[attr-defined]
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(entry.fingerprint)
    fastavro.schemaless_writer(buf, entry.parsed, _to_record(model))
    return buf.getvalue()


def peek_schema(data: bytes) -> SchemaEntry:
    if len(data) < HEADER_LEN or data[:2] != MAGIC:
        raise DecodeError("not-avro", "missing the Avro single-object header C3 01")
    entry = registry().by_fingerprint.get(data[2:HEADER_LEN])
    if entry is None:
        raise DecodeError("unknown-schema", f"no schema with fingerprint {data[2:HEADER_LEN].hex()}")
    return entry


def decode(data: bytes | None, max_bytes: int | None = None) -> BaseModel:
    """Decode any event; raises ``DecodeError`` with a reason tag for anything unreadable.

    ``max_bytes`` refuses larger messages before any parsing (reason ``oversized``).
    """
    if not data:
        raise DecodeError("empty", "message has no value")
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError("oversized", f"{len(data)} bytes > {max_bytes}")
    writer = peek_schema(data)
    reader = registry().current.get(writer.name)
    if reader is None:
        raise DecodeError("unknown-schema", f"{writer.name} has no current schema")
    try:
        # Same schema on both sides (the usual case): no resolution step.
        resolve = None if reader is writer else reader.parsed
        record = fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer.parsed, resolve)
    except Exception as exc:  # fastavro raises several types for corrupt bodies
        raise DecodeError("corrupt-body", f"{writer.name}: {exc!r}") from exc
    try:
        return _from_record(_MODELS[writer.name], record)  # type: ignore[arg-type]
    except (ValidationError, ValueError, KeyError) as exc:
        raise DecodeError("invalid-event", f"{writer.name}: {exc}") from exc


def _zigzag_varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_landing(decision: bytes, partition: int, offset: int) -> bytes:
    """A DecisionRecorded stored before its command was produced, plus where that command landed.

    ``command_partition`` and ``command_offset`` are the schema's last two fields, written as two
    null branches (``00 00``) until the command's produce is acknowledged. Rewriting those two
    bytes spares a second full encode per decision (the hot path encodes each decision once).
    """
    entry = peek_schema(decision)
    if entry.name != "io.streamagent.events.DecisionRecorded" or not entry.current or decision[-2:] != b"\x00\x00":
        record = decode(decision)
        return encode(record.model_copy(update={"command_partition": partition, "command_offset": offset}))
    return decision[:-2] + b"\x02" + _zigzag_varint(partition) + b"\x02" + _zigzag_varint(offset)


def with_landings(decision: bytes, landings: dict[str, tuple[int, int]]) -> bytes:
    """A fan-out's DecisionRecorded plus where each of its commands landed, by command id. One command:
    the two-byte rewrite of ``with_landing``; several: decoded and encoded again (rarer, and one encode)."""
    record = decode(decision)
    assert isinstance(record, DecisionRecorded)
    first = landings.get(record.command_id or "")
    if not record.parallel:
        return with_landing(decision, *first) if first is not None else decision
    parallel = [
        p.model_copy(update={"command_partition": at[0], "command_offset": at[1]})
        if (at := landings.get(p.command_id)) is not None
        else p
        for p in record.parallel
    ]
    update: dict[str, object] = {"parallel": parallel}
    if first is not None:
        update.update(command_partition=first[0], command_offset=first[1])
    return encode(record.model_copy(update=update))
