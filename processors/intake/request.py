"""What an upstream system may send to the intake topic, and how it becomes a ``RunRequested``.

A request arrives as the ``RunRequested`` Avro record (single-object encoding: the ``.avsc`` file is all
a producer needs) or as a JSON object of the same fields, so a webhook relay or ``kcat`` can submit. Any
key or none, any partitioner: intake reads the run's identity from the value, never from the record key
or partition.

Identity and deduplication. The run id *is* the idempotency key: a request that names ``run_id`` runs
under it; one that names only ``idempotency_key`` runs under ``stable_id("intake", key)``; one that names
neither runs under an id made from its position in the intake topic, so redelivering that same record
(a crash before intake committed) still makes the same run. The ``RunRequested`` appended to the run log
has an event id made from the run id, so however often the same request arrives (sent twice, intake
restarted, the intake topic replayed) the run log holds copies of one event, which the fold and the
projection take once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ValidationError

from streamagent import codec
from streamagent.errors import DecodeError, Rejected
from streamagent.events import MemoryWrite, RunRequested, now, requested_event_id, stable_id

# A run id travels in record keys, URLs and file names: printable, short, no spaces.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
# Labels are free-form (routing, tags, an upstream's ids): bounded so one request cannot carry a table,
# and the request as a whole by STREAMAGENT_MAX_EVENT_BYTES.
MAX_LABELS = 1000
MAX_LABEL_KEY_CHARS = 100
MAX_LABEL_VALUE_CHARS = 1000
# A request dated further ahead than this is refused: its deadline would be counted from the future.
MAX_CLOCK_SKEW = timedelta(minutes=5)
_JSON_ONLY = {"idempotency_key"}
_FIELDS = set(RunRequested.model_fields) | _JSON_ONLY
_PARENT_FIELDS = ("parent_run_id", "parent_step", "parent_command_id")


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "request"
        parts.append(f"{field}: {error['msg']}")
    return "; ".join(parts)


def fields_of(value: bytes | None, max_bytes: int, expected: type[BaseModel] = RunRequested) -> dict[str, Any]:
    """The request's fields from an Avro or a JSON value; ``DecodeError`` names what is unreadable."""
    if not value:
        raise DecodeError("empty", "the request has no value")
    if len(value) > max_bytes:
        raise DecodeError("oversized", f"{len(value)} bytes, more than the {max_bytes} a request may have")
    if value[:2] == codec.MAGIC:
        event = codec.decode(value, max_bytes)
        if not isinstance(event, expected):
            raise DecodeError(
                "unexpected-event", f"a {type(event).__name__}: this intake topic takes {expected.__name__} only"
            )
        return event.model_dump(mode="python")
    try:
        fields = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(
            "not-a-request", f"neither Avro (single-object encoding, C3 01 …) nor a JSON object: {exc}"
        ) from None
    if not isinstance(fields, dict):
        raise DecodeError("not-a-request", f"JSON {type(fields).__name__}, not an object of request fields")
    return fields


def admit(fields: dict[str, Any], workflows: Collection[str], position: tuple[str, int, int]) -> RunRequested:
    """The ``RunRequested`` to append for ``fields``, or ``Rejected`` naming every field that is wrong."""
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise Rejected("invalid-request", f"unknown field(s): {', '.join(unknown)}")
    data = dict(fields)
    key = data.pop("idempotency_key", None)
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        raise Rejected("invalid-request", "idempotency_key: must be a string of 1 to 200 characters")
    run_id = data.get("run_id")
    if run_id is None:
        run_id = stable_id("intake", key) if key is not None else stable_id("intake", *map(str, position))
    elif not isinstance(run_id, str) or not RUN_ID.match(run_id):
        raise Rejected(
            "invalid-request", "run_id: 1 to 100 letters, digits, '.', '_', ':' or '-', starting alphanumeric"
        )
    upstream_id = data.pop("event_id", None)
    data.pop("causation_id", None)
    data.pop("schema_version", None)
    data.update(run_id=run_id, event_id=requested_event_id(run_id))
    # The upstream's own id of what it sent, kept as the cause: the audit trail starts outside.
    if isinstance(upstream_id, str) and upstream_id:
        data["causation_id"] = upstream_id[:200]
    labels = data.get("labels") or {}
    if isinstance(labels, dict) and (
        len(labels) > MAX_LABELS
        or any(len(str(k)) > MAX_LABEL_KEY_CHARS or len(str(v)) > MAX_LABEL_VALUE_CHARS for k, v in labels.items())
    ):
        raise Rejected(
            "invalid-request",
            f"labels: at most {MAX_LABELS}, keys of at most {MAX_LABEL_KEY_CHARS} characters, values of at most"
            f" {MAX_LABEL_VALUE_CHARS}",
        )
    linked = sorted(f for f in _PARENT_FIELDS if data.get(f) is not None)
    if linked:
        # Only a parent's step starts a child run (the decision processor signs it): an upstream request
        # that says it is one would otherwise answer for another run's step.
        raise Rejected("invalid-request", f"{', '.join(linked)}: a child run is started by its parent's step only")
    try:
        request = RunRequested.model_validate(data)
    except ValidationError as exc:
        raise Rejected("invalid-request", _describe(exc)) from None
    if request.workflow not in workflows:
        known = ", ".join(sorted(workflows)) or "none"
        raise Rejected("unknown_workflow", f"workflow: unknown workflow {request.workflow!r} (known: {known})")
    if request.occurred_at - now() > MAX_CLOCK_SKEW:
        raise Rejected("invalid-request", f"occurred_at: {request.occurred_at.isoformat()} is in the future")
    return request


_WRITE_FIELDS = set(MemoryWrite.model_fields)


def admit_write(fields: dict[str, Any], position: tuple[str, int, int]) -> MemoryWrite:
    """The ``MemoryWrite`` to hand the memory processor, or ``Rejected`` naming every field that is wrong.

    Like a request's run id, a write's ``write_id`` is its idempotency key: one that names none gets one
    made from its position in the intake topic, so a redelivered record is still one change."""
    unknown = sorted(set(fields) - _WRITE_FIELDS)
    if unknown:
        raise Rejected("invalid-memory-write", f"unknown field(s): {', '.join(unknown)}")
    data = dict(fields)
    if data.get("write_id") is None:
        data["write_id"] = stable_id("memory", *map(str, position))
    data.pop("schema_version", None)
    try:
        write = MemoryWrite.model_validate(data)
    except ValidationError as exc:
        raise Rejected("invalid-memory-write", _describe(exc)) from None
    if write.delete and (write.set or write.unset):
        raise Rejected("invalid-memory-write", "delete: a deletion sets and unsets nothing")
    if not (write.delete or write.set or write.unset):
        raise Rejected("invalid-memory-write", "set: a write changes something (set, unset or delete)")
    if write.occurred_at - now() > MAX_CLOCK_SKEW:
        raise Rejected("invalid-memory-write", f"occurred_at: {write.occurred_at.isoformat()} is in the future")
    return write
