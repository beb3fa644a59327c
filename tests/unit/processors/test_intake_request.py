"""Intake's reading of upstream requests (processors/intake/request.py): Avro or JSON in, one validated
``RunRequested`` out, or a refusal that names the field."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from streamagent.processors.intake.request import admit, fields_of

from streamagent import codec
from streamagent.errors import DecodeError, Rejected
from streamagent.events import RunRequested, ToolResult, ToolStatus, now, requested_event_id, stable_id

WORKFLOWS = frozenset({"onboarding"})
AT = ("t.agent.run.requests", 2, 17)
MAX = 1024 * 1024


def _fields(**extra: Any) -> dict[str, Any]:
    return {
        "company_name": "Acme",
        "company_domain": "Acme.IO",
        "contact_name": "Ada",
        "contact_email": "ada@acme.io",
        "requested_by": "crm",
        **extra,
    }


def _admit(value: bytes) -> RunRequested:
    return admit(fields_of(value, MAX), WORKFLOWS, AT)


def test_avro_and_json_give_the_same_request() -> None:
    avro = RunRequested.model_validate({**_fields(), "run_id": "run-1"})
    from_avro = _admit(codec.encode(avro))
    from_json = _admit(json.dumps({**_fields(), "run_id": "run-1"}).encode())
    assert from_avro.model_dump(exclude={"causation_id", "occurred_at"}) == from_json.model_dump(
        exclude={"causation_id", "occurred_at"}
    )
    assert from_json.company_domain == "acme.io" and from_json.workflow == "onboarding"
    # One event id per run, whoever sent it and however often: the fold and projection take it once.
    assert from_avro.event_id == from_json.event_id == requested_event_id("run-1")
    assert from_avro.causation_id == avro.event_id  # the upstream's own id, kept as the cause


def test_the_run_id_comes_from_the_request_its_idempotency_key_or_its_position() -> None:
    assert _admit(json.dumps({**_fields(), "run_id": "crm-42"}).encode()).run_id == "crm-42"
    keyed = _admit(json.dumps({**_fields(), "idempotency_key": "signup-7"}).encode())
    assert keyed.run_id == stable_id("intake", "signup-7")
    assert _admit(json.dumps({**_fields(), "idempotency_key": "signup-7"}).encode()).run_id == keyed.run_id
    # Neither: the record's place in the intake topic, the same when that record is delivered again.
    bare = _admit(json.dumps(_fields()).encode())
    assert bare.run_id == stable_id("intake", *map(str, AT)) == _admit(json.dumps(_fields()).encode()).run_id


@pytest.mark.parametrize(
    ("fields", "reason", "names"),
    [
        (_fields(contact_email="not-an-address"), "invalid-request", "contact_email"),
        (_fields(company_domain="no_dots"), "invalid-request", "company_domain"),
        (_fields(company_name=""), "invalid-request", "company_name"),
        (_fields(colour="blue"), "invalid-request", "unknown field(s): colour"),
        (_fields(workflow="kyc"), "unknown_workflow", "workflow: unknown workflow 'kyc' (known: onboarding)"),
        (_fields(run_id="has spaces"), "invalid-request", "run_id"),
        (_fields(idempotency_key=""), "invalid-request", "idempotency_key"),
        (_fields(labels={f"k{i}": "v" for i in range(1001)}), "invalid-request", "labels"),
        (_fields(occurred_at=(now() + timedelta(hours=1)).isoformat()), "invalid-request", "occurred_at"),
        (_fields(parent_run_id="r0", parent_step="kyc"), "invalid-request", "parent_run_id, parent_step: a child"),
    ],
    ids=[
        "email",
        "domain",
        "name",
        "unknown-field",
        "workflow",
        "run-id",
        "idempotency-key",
        "labels",
        "future",
        "child",
    ],
)
def test_a_bad_request_is_refused_naming_the_field(fields: dict[str, Any], reason: str, names: str) -> None:
    with pytest.raises(Rejected) as refused:
        _admit(json.dumps(fields).encode())
    assert refused.value.reason == reason and names in refused.value.detail


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty"),
        (b"hello", "not-a-request"),
        (b"[1, 2]", "not-a-request"),
        (b"\xc3\x01" + b"\x00" * 8, "unknown-schema"),
        (b"{" + b" " * MAX, "oversized"),
    ],
    ids=["empty", "text", "json-list", "avro-unknown", "oversized"],
)
def test_an_unreadable_value_is_refused_with_its_reason(value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as refused:
        fields_of(value, MAX)
    assert refused.value.reason == reason


def test_only_requests_come_through_intake() -> None:
    result = ToolResult(run_id="r", command_id="c", tool="jira", step="jira", status=ToolStatus.succeeded)
    with pytest.raises(DecodeError, match="takes RunRequested only"):
        fields_of(codec.encode(result), MAX)
