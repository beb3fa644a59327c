"""Avro single-object encoding of every event, with no schema registry needed.

Wire format (Avro spec, "Single object encoding"): ``C3 01`` + the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's canonical form + the Avro binary body. Every
schema under ``schemas/`` (current and ``history/``) is known by fingerprint, so a reader can
decode an event written with an older schema and resolve it to the current one.
"""

from __future__ import annotations

import io
import json
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from functools import cache, lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import fastavro
import fastavro.schema
from pydantic import BaseModel, EmailStr, ValidationError

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


# -- trusted decoding -----------------------------------------------------------------------------------
#
# An event that verified as written by one of our own components (``authn``: its ``streamagent-auth``
# header, under the key of the role that writes its type) was built and validated by that writer before it
# was encoded. Validating it again on every hop cost 10-45 µs an event (codec_bench.py), most of a decode.
# ``decode(..., trusted=True)`` builds the model with ``model_construct`` instead, converting only what the
# validators would have converted from fastavro's record: nested models and enums (datetimes come back
# from fastavro as aware datetimes, JSON fields are parsed first as for the validated path). Events from
# outside (requests, tool results: what a tool reports about the world) are never decoded this way.

Convert = Callable[[Any], Any]


class _Unsupported(Exception):
    """A field type the trusted builder does not know how to rebuild: the model is always validated."""


def _identity(value: Any) -> Any:
    return value


def _optional(inner: Convert) -> Convert:
    return lambda value: None if value is None else inner(value)


def _each(inner: Convert, container: type) -> Convert:
    return lambda value: container(inner(item) for item in value)


def _values(inner: Convert) -> Convert:
    return lambda value: {key: inner(item) for key, item in value.items()}


_PLAIN = (str, int, float, bool, bytes, dict, list, EmailStr)  # EmailStr: a str once validated


def _converter(tp: Any) -> Convert:
    """How to turn fastavro's value of a field of type ``tp`` into what validation would have made of it."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp in _PLAIN or origin is Literal:
        return _identity
    if origin is Annotated:
        return _converter(args[0])
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if len(present) == 1:
            inner = _converter(present[0])
            return _identity if inner is _identity else _optional(inner)
        if all(_converter(a) is _identity for a in present):
            return _identity
        raise _Unsupported(tp)
    if origin in (list, tuple, set, frozenset):
        inner = _converter(args[0]) if args else _identity
        if origin is list and inner is _identity:
            return _identity
        return _each(inner, origin)
    if origin is dict:
        inner = _converter(args[1]) if len(args) == 2 else _identity
        return _identity if inner is _identity else _values(inner)
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            return _builder(tp)
        if issubclass(tp, Enum):
            return {member.value: member for member in tp}.__getitem__  # a symbol it lacks: KeyError, refused
        if issubclass(tp, datetime):  # fastavro gives timestamp-millis as aware datetimes already
            return _identity
    raise _Unsupported(tp)


def _validates_in_python(model: type[BaseModel]) -> bool:
    """Whether validating ``model`` runs Python code (its own validators, an e-mail check): that is what a
    trusted decode saves. Anything else pydantic-core validates in Rust faster than Python can build the
    model without validating it (codec_bench: a StateSnapshot 42 µs validated, 46 µs built in Python)."""
    decorators = model.__pydantic_decorators__
    if decorators.field_validators or decorators.model_validators:
        return True
    return any(info.annotation is EmailStr for info in model.model_fields.values())


@cache
def _builder(model: type[BaseModel]) -> Convert:
    """A function building ``model`` from a record without validation, or ``model.model_validate`` where that
    is as cheap (no Python validators) or a field has a type the builder does not know."""
    if not _validates_in_python(model):
        return model.model_validate
    try:
        fields = [(name, _converter(info.annotation)) for name, info in model.model_fields.items()]
    except _Unsupported:
        return model.model_validate
    if model.__private_attributes__:
        return model.model_validate
    converted = [(name, convert) for name, convert in fields if convert is not _identity]
    names = tuple(name for name, _ in fields)
    new = object.__new__
    setattr_ = object.__setattr__

    def build(record: Any) -> BaseModel:
        if not isinstance(record, dict):
            return model.model_validate(record)
        for name, convert in converted:
            if name in record:
                record[name] = convert(record[name])
        try:
            values = {name: record[name] for name in names}
        except KeyError:  # a field the record lacks: model_construct fills in its default
            return model.model_construct(**record)
        # What model_construct does for a record that has every field, without its per-field Python
        # loop (aliases, defaults, extras): several times faster on a snapshot of nested steps.
        built = new(model)
        setattr_(built, "__dict__", values)
        setattr_(built, "__pydantic_fields_set__", set(names))
        setattr_(built, "__pydantic_extra__", None)
        setattr_(built, "__pydantic_private__", None)
        return built

    return build


def _from_record(model: type[BaseModel], record: dict[str, Any], trusted: bool = False) -> BaseModel:
    for name in getattr(model, "JSON_FIELDS", ()):
        if isinstance(record.get(name), str):
            record[name] = json.loads(record[name])
    if model is StateSnapshot:
        for step in record["steps"]:
            step["output"] = json.loads(step["output"])
    if model is DecisionRecorded:
        for dispatch in record.get("parallel") or ():
            dispatch["arguments"] = json.loads(dispatch["arguments"])
    return _builder(model)(record) if trusted else model.model_validate(record)


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


def decode(data: bytes | None, max_bytes: int | None = None, *, trusted: bool = False) -> BaseModel:
    """Decode any event; raises ``DecodeError`` with a reason tag for anything unreadable.

    ``max_bytes`` refuses larger messages before any parsing (reason ``oversized``). ``trusted``: the
    bytes verified as written by one of our own components, which validated the event; it is built
    without validating it again (see above). Never for an event from outside.
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
        return _from_record(_MODELS[writer.name], record, trusted)  # type: ignore[arg-type]
    except (ValidationError, ValueError, KeyError, TypeError) as exc:
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
