"""The Avro single-object codec: round trips, the wire header, schema evolution and decode errors."""

from __future__ import annotations

import io
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema
import pytest
from pydantic import BaseModel

from streamagent import codec
from streamagent.events import (
    ALL_MODELS,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalState,
    ApprovalStatus,
    CommandLost,
    CommandResent,
    DecisionAction,
    DecisionRecorded,
    EntityVersion,
    FailureStatus,
    MemoryChanged,
    MemoryWrite,
    OnboardingRequest,
    RunCancelRequested,
    RunCompleted,
    RunDeadlineExceeded,
    RunFailed,
    RunPlan,
    RunRequested,
    RunStatus,
    StateSnapshot,
    StepState,
    StepStatus,
    ToolCommand,
    ToolResult,
    ToolStatus,
)

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "schemas"
CURRENT_SCHEMAS = sorted(SCHEMA_DIR.glob("*.avsc"))
ALL_SCHEMAS = sorted(SCHEMA_DIR.rglob("*.avsc"))
V1_RUN_REQUESTED = SCHEMA_DIR / "history" / "RunRequested.v1.avsc"

# timestamp-millis on the wire: sample times carry whole milliseconds so they survive exactly.
T0 = datetime(2024, 5, 1, 12, 30, 15, 123000, tzinfo=UTC)
RUN = "6f1c2a52-8d0e-4c57-9a0b-0d3c1c8e2f11"


# -- CRC-64-AVRO and the parsing canonical form, written from the Avro spec --------------------------
CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return table


CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    fp = CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _full_name(name: str, namespace: str | None) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def canonical_form(schema: Any, namespace: str | None = None, seen: set[str] | None = None) -> str:
    """Parsing Canonical Form (Avro spec): PRIMITIVES, FULLNAMES, STRIP, ORDER, STRINGS, WHITESPACE."""
    seen = set() if seen is None else seen
    if isinstance(schema, list):
        return "[" + ",".join(canonical_form(s, namespace, seen) for s in schema) + "]"
    if isinstance(schema, str):
        return json.dumps(schema if schema in PRIMITIVES else _full_name(schema, namespace))
    kind = schema["type"]
    if not isinstance(kind, str) or kind in PRIMITIVES:
        return canonical_form(kind, namespace, seen)  # {"type": "long", "logicalType": ...} -> "long"
    if kind == "array":
        return '{"type":"array","items":' + canonical_form(schema["items"], namespace, seen) + "}"
    if kind == "map":
        return '{"type":"map","values":' + canonical_form(schema["values"], namespace, seen) + "}"
    full = _full_name(schema["name"], schema.get("namespace", namespace))
    if full in seen:
        return json.dumps(full)
    seen.add(full)
    inner = full.rpartition(".")[0] or None
    parts = [f'"name":{json.dumps(full)}', f'"type":"{kind}"']
    if kind == "record":
        fields = ",".join(
            '{"name":' + json.dumps(f["name"]) + ',"type":' + canonical_form(f["type"], inner, seen) + "}"
            for f in schema["fields"]
        )
        parts.append(f'"fields":[{fields}]')
    elif kind == "enum":
        parts.append('"symbols":' + json.dumps(schema["symbols"], separators=(",", ":")))
    elif kind == "fixed":
        parts.append(f'"size":{schema["size"]}')
    return "{" + ",".join(parts) + "}"


def test_crc64_avro_matches_the_spec_test_vectors() -> None:
    # Fingerprints from Avro's share/test/data/schema-tests.txt, as signed 64-bit longs.
    assert crc64_avro(b'"null"') == 7195948357588979594
    assert crc64_avro(b'"int"') == 8247732601305521295
    assert crc64_avro(b'"boolean"') == (-6970731678124411036) % 2**64


# -- samples -----------------------------------------------------------------------------------------
def sample_events() -> list[BaseModel]:
    request = OnboardingRequest(
        company_name="Acme Robotics",
        company_domain="acme-robotics.io",
        contact_name="Ada Lovelace",
        contact_email="ada@acme-robotics.io",
        goal="onboard new client",
        requested_by="crm",
        labels={"tier": "gold"},
    )
    enrich_output = {"name": "Acme Robotics", "industry": "Software", "employees": 60, "tags": ["b2b", None]}
    return [
        RunRequested(
            event_id="e-1",
            run_id=RUN,
            occurred_at=T0,
            company_name="Acme Robotics",
            company_domain="acme-robotics.io",
            contact_name="Ada Lovelace",
            contact_email="ada@acme-robotics.io",
            goal="onboard new client",
            requested_by="crm",
            deadline_s=90.5,
            labels={"tier": "gold", "source": "signup"},
        ),
        DecisionRecorded(
            event_id="e-2",
            run_id=RUN,
            causation_id="e-1",
            occurred_at=T0 + timedelta(milliseconds=5),
            decision_id="d-1",
            based_on_version=1,
            action=DecisionAction.dispatch,
            step="enrich",
            tool="enrich",
            command_id="c-1",
            arguments={"domain": "acme-robotics.io", "nested": {"n": [1, 2.5, True]}},
            reason="enrich is the next step",
            decider="openai:gpt-x",
            context={"version": 1, "results": {}, "available_tools": ["enrich", "jira"]},
            prompt_tokens=1200,
            completion_tokens=80,
            cost_usd=0.0042,
        ),
        ToolCommand(
            event_id="e-3",
            run_id=RUN,
            causation_id="d-1",
            occurred_at=T0 + timedelta(milliseconds=6),
            command_id="c-1",
            decision_id="d-1",
            tool="enrich",
            step="enrich",
            arguments={"domain": "acme-robotics.io"},
            deadline_at=T0 + timedelta(seconds=120),
            signature="v1:k1:" + "0f" * 32,
            budget_tokens=5000,
            budget_cost_usd=0.05,
        ),
        ToolResult(
            event_id="e-4",
            run_id=RUN,
            causation_id="e-3",
            occurred_at=T0 + timedelta(milliseconds=250),
            command_id="c-1",
            tool="enrich",
            step="enrich",
            status=ToolStatus.succeeded,
            output=enrich_output,
            attempts=3,
            duration_ms=245,
        ),
        ToolResult(
            event_id="e-5",
            run_id=RUN,
            occurred_at=T0 + timedelta(milliseconds=300),
            command_id="c-2",
            tool="jira",
            step="jira",
            operation="compensate",
            status=ToolStatus.failed,
            error="answered 409",
            error_kind="permanent",
        ),
        RunCompleted(
            event_id="e-6",
            run_id=RUN,
            occurred_at=T0 + timedelta(seconds=2),
            decision_id="d-5",
            results={"enrich": enrich_output, "jira": {"key": "ACME1A2B"}},
            reason="every step succeeded",
        ),
        RunFailed(
            event_id="e-7",
            run_id=RUN,
            occurred_at=T0 + timedelta(seconds=3),
            decision_id="d-6",
            status=FailureStatus.escalated,
            reason="step slack failed",
            failed_step="slack",
            results={"enrich": enrich_output},
        ),
        RunDeadlineExceeded(
            event_id="e-8",
            run_id=RUN,
            occurred_at=T0 + timedelta(seconds=700),
            deadline_at=T0 + timedelta(seconds=600),
        ),
        CommandLost(
            event_id="e-9",
            run_id=RUN,
            occurred_at=T0 + timedelta(seconds=30),
            command_id="cmd-2",
            step="jira",
            tool="jira",
            redrive=1,
            evidence="the jira tool's group committed past offset 7 and no result came",
        ),
        CommandResent(
            event_id="e-10",
            run_id=RUN,
            occurred_at=T0 + timedelta(seconds=31),
            command_id="cmd-2",
            step="jira",
            tool="jira",
            redrive=1,
            command_partition=3,
            command_offset=12,
        ),
        ApprovalRequested(
            event_id="e-11",
            run_id=RUN,
            occurred_at=T0 + timedelta(seconds=32),
            request_id="req-1",
            decision_id="dec-4",
            step="email",
            tool="email",
            arguments={"to": "ada@elsewhere.net"},
            arguments_digest="ab" * 32,
            reason="email to an address outside the allow-list",
            policy_version="85768119cbb5",
            expires_at=T0 + timedelta(hours=24),
        ),
        ApprovalGranted(event_id="e-12", run_id=RUN, request_id="req-1", step="email", by="grace", note="ok"),
        ApprovalDenied(event_id="e-13", run_id=RUN, request_id="req-1", step="email", by="grace"),
        ApprovalExpired(event_id="e-14", run_id=RUN, request_id="req-1", step="email"),
        RunCancelRequested(event_id="e-15", run_id=RUN, by="grace", reason="the client withdrew"),
        StateSnapshot(
            run_id=RUN,
            version=7,
            status=RunStatus.escalated,
            request=request,
            steps=[
                StepState(
                    name="enrich",
                    status=StepStatus.succeeded,
                    command_id="c-1",
                    decision_id="d-1",
                    attempts=1,
                    output=enrich_output,
                ),
                StepState(
                    name="jira",
                    status=StepStatus.compensated,
                    command_id="c-2",
                    decision_id="d-2",
                    attempts=1,
                    output={"id": "10001", "key": "ACME1A2B", "url": "http://sandbox/jira/10001"},
                ),
                StepState(name="email", status=StepStatus.failed, command_id="c-3", error="permanent: 400"),
                StepState(name="slack"),
            ],
            created_at=T0,
            updated_at=T0 + timedelta(seconds=3),
            deadline_at=T0 + timedelta(seconds=600),
            last_event_id="e-7",
            deadline_exceeded=True,
            reason="step email failed",
            superseded_decisions=2,
            approvals=[
                ApprovalState(
                    request_id="req-1",
                    step="email",
                    tool="email",
                    arguments_digest="ab" * 32,
                    status=ApprovalStatus.denied,
                    reason="email to an address outside the allow-list",
                    requested_at=T0 + timedelta(seconds=32),
                    expires_at=T0 + timedelta(hours=24),
                    by="grace",
                    decided_at=T0 + timedelta(seconds=40),
                )
            ],
            decisions=4,
            tool_calls=3,
            tokens=1620,
            cost_usd=0.0063,
            tool_tokens=420,
            tool_cost_usd=0.0021,
            signature="s1:key-1:" + "0" * 64,
            plan=RunPlan(
                plan="1. enrich\n2. jira, then email and slack",
                model="planner-model",
                based_on_version=1,
                decision_id="d-1",
            ),
        ),
        MemoryChanged(
            run_id=RUN,
            causation_id="d-3",
            decision_id="d-3",
            step="email",
            ref="contact/acme.io",
            read_version=3,
            version=4,
            as_of=T0 + timedelta(seconds=2),
            occurred_at=T0 + timedelta(seconds=3),
        ),
        MemoryWrite(
            write_id="w-1",
            entity="contact",
            key="acme.io",
            set={"email": "ada@acme.io", "seats": 12, "tags": ["b2b"]},
            unset=["phone"],
            expected_version=3,
            writer="crm",
            causation_id="crm-event-9",
            occurred_at=T0,
        ),
        EntityVersion(
            entity="contact",
            key="acme.io",
            version=4,
            fields={"email": "ada@acme.io", "name": "Ada"},
            as_of=T0 + timedelta(seconds=1),
            writer="crm",
            write_id="w-1",
            recent_writes=["w-0", "w-1"],
        ),
    ]


SAMPLES = sample_events()
SAMPLE_IDS = [f"{type(m).__name__}-{i}" for i, m in enumerate(SAMPLES)]


def test_samples_cover_every_model() -> None:
    assert {type(m) for m in SAMPLES} == set(ALL_MODELS)


@pytest.mark.parametrize("event", SAMPLES, ids=SAMPLE_IDS)
def test_round_trip_is_equal(event: BaseModel) -> None:
    decoded = codec.decode(codec.encode(event))
    assert type(decoded) is type(event)
    assert decoded == event
    assert decoded.model_dump() == event.model_dump()


def _same_types(a: Any, b: Any, path: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ in value or in type, recursively (StrEnum == str, so == is not enough)."""
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, BaseModel):
        return [
            d
            for name in type(a).model_fields
            for d in _same_types(getattr(a, name), getattr(b, name), f"{path}.{name}")
        ]
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return [f"{path}: length"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _same_types(x, y, f"{path}[{i}]")]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys"]
        return [d for k in a for d in _same_types(a[k], b[k], f"{path}[{k}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize("event", SAMPLES, ids=SAMPLE_IDS)
def test_trusted_decode_builds_what_validation_builds(event: BaseModel) -> None:
    # An event verified as a core component's is built without validating it again (issue 24): it must be
    # the very same model, field by field and type by type, as the validated decode gives.
    data = codec.encode(event)
    validated, trusted = codec.decode(data), codec.decode(data, trusted=True)
    assert _same_types(validated, trusted) == []
    assert trusted == validated and trusted.model_fields_set == validated.model_fields_set
    assert trusted.model_dump(mode="json") == validated.model_dump(mode="json")


def test_trusted_decode_skips_validation_and_the_default_does_not() -> None:
    # What the trust boundary means: the bytes of a request too long to be valid are refused unless trusted,
    # which is why only events verified as the core's own (never intake's requests) are decoded trusted.
    long_name = _raw("RunRequested", _run_requested_record(company_name="x" * 500))
    with pytest.raises(codec.DecodeError) as refused:
        codec.decode(long_name)
    assert refused.value.reason == "invalid-event"
    assert codec.decode(long_name, trusted=True).company_name == "x" * 500  # type: ignore[attr-defined]


def test_snapshot_round_trip_keeps_step_outputs() -> None:
    snapshot = next(m for m in SAMPLES if isinstance(m, StateSnapshot))
    assert isinstance(snapshot, StateSnapshot)
    decoded = codec.decode(codec.encode(snapshot))
    assert isinstance(decoded, StateSnapshot)
    assert decoded.step("enrich").output["tags"] == ["b2b", None]
    assert decoded.step("jira").status is StepStatus.compensated
    assert decoded.results() == snapshot.results() == {"enrich": snapshot.step("enrich").output}


def test_round_trip_of_an_event_with_a_default_timestamp() -> None:
    event = RunCompleted(run_id=RUN, decision_id="d", reason="done", occurred_at=T0 + timedelta(microseconds=456))
    assert codec.decode(codec.encode(event)) == event


# -- the wire header ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ALL_SCHEMAS, ids=lambda p: p.name)
def test_canonical_form_and_fingerprint_follow_the_spec(path: Path) -> None:
    raw = json.loads(path.read_text())
    canonical = canonical_form(raw)
    parsed = fastavro.parse_schema(raw, _write_hint=False)
    assert canonical == fastavro.schema.to_parsing_canonical_form(parsed)
    assert codec.fingerprint(parsed) == crc64_avro(canonical.encode()).to_bytes(8, "little")


@pytest.mark.parametrize("event", SAMPLES, ids=SAMPLE_IDS)
def test_wire_header_is_c301_and_the_little_endian_crc64_of_the_schema(event: BaseModel) -> None:
    name = event.SCHEMA_NAME  # type: ignore[attr-defined]
    path = SCHEMA_DIR / (name.rsplit(".", 1)[1] + ".avsc")
    expected = crc64_avro(canonical_form(json.loads(path.read_text())).encode()).to_bytes(8, "little")
    data = codec.encode(event)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == expected
    assert codec.HEADER_LEN == 10
    assert codec.peek_schema(data).name == name
    # The body after the header is plain schemaless Avro of the current schema.
    record = fastavro.schemaless_reader(io.BytesIO(data[10:]), codec.registry().current[name].parsed, None)
    assert isinstance(record, dict)
    if isinstance(event, MemoryWrite | EntityVersion):  # memory is keyed by entity, not by run
        assert (record["entity"], record["key"]) == ("contact", "acme.io")
    else:
        assert record.get("run_id") == RUN


def test_fingerprints_differ_between_schema_versions() -> None:
    current = codec.registry().current["io.streamagent.events.RunRequested"]
    old = codec.registry().by_fingerprint[_v1_fingerprint()]
    assert old.name == current.name
    assert old.fingerprint != current.fingerprint
    assert old.current is False and current.current is True


# -- schema evolution --------------------------------------------------------------------------------
def _v1_parsed() -> Any:
    return fastavro.parse_schema(json.loads(V1_RUN_REQUESTED.read_text()), _write_hint=False)


def _v1_fingerprint() -> bytes:
    return crc64_avro(canonical_form(json.loads(V1_RUN_REQUESTED.read_text())).encode()).to_bytes(8, "little")


def test_run_requested_written_with_the_v1_schema_decodes_with_the_current_reader() -> None:
    old_record = {
        "event_id": "old-1",
        "run_id": RUN,
        "causation_id": None,
        "occurred_at": T0,
        "schema_version": 1,
        "company_name": "Initech",
        "company_domain": "initech.com",
        "contact_name": "Peter Gibbons",
        "contact_email": "peter@initech.com",
        "goal": "onboard new client",
        "requested_by": "legacy-crm",
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _v1_parsed(), old_record)
    data = b"\xc3\x01" + _v1_fingerprint() + buf.getvalue()

    decoded = codec.decode(data)

    assert isinstance(decoded, RunRequested)
    assert decoded.deadline_s is None
    assert decoded.labels == {}
    assert decoded.schema_version == 1
    assert decoded.company_name == "Initech"
    assert decoded.contact_email == "peter@initech.com"
    assert decoded.occurred_at == T0
    assert decoded.event_id == "old-1"


def test_tool_command_written_with_the_v1_schema_decodes_unsigned() -> None:
    """A command from before signing (v1: no signature field) still decodes, with an empty signature,
    so the tool can refuse it by name (``unauthenticated``) instead of failing to read it."""
    v1 = json.loads((SCHEMA_DIR / "history" / "ToolCommand.v1.avsc").read_text())
    assert "signature" not in _avro_field_names(v1)
    old_record = {
        "event_id": "old-cmd",
        "run_id": RUN,
        "causation_id": "d-1",
        "occurred_at": T0,
        "schema_version": 1,
        "command_id": "c-1",
        "decision_id": "d-1",
        "tool": "jira",
        "step": "jira",
        "operation": "execute",
        "arguments": '{"key": "ACME"}',
        "deadline_at": T0 + timedelta(seconds=120),
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(v1, _write_hint=False), old_record)
    fingerprint = crc64_avro(canonical_form(v1).encode()).to_bytes(8, "little")

    decoded = codec.decode(b"\xc3\x01" + fingerprint + buf.getvalue())

    assert isinstance(decoded, ToolCommand)
    assert decoded.signature == ""
    assert decoded.schema_version == 1
    assert decoded.arguments == {"key": "ACME"}
    assert fingerprint != _current("ToolCommand").fingerprint


def test_state_snapshot_written_with_the_v3_schema_decodes_without_a_plan_or_governance() -> None:
    """A snapshot from before the plan was part of the state (v3 and older: no ``plan`` field) still
    decodes with the current reader, with no plan; the current one keeps its plan (v4)."""
    current = next(m for m in SAMPLES if isinstance(m, StateSnapshot))
    assert (
        current.plan is not None and current.schema_version == 9
    )  # 4: plan; 5: steps' end; 6: tools; 7: parent; 8: cancel; 9: the cancelled status
    for old in ("StateSnapshot.v3.avsc", "StateSnapshot.v2.avsc"):
        raw = json.loads((SCHEMA_DIR / "history" / old).read_text())
        assert "plan" not in _avro_field_names(raw)
        parsed = fastavro.parse_schema(raw, _write_hint=False)
        names = set(_avro_field_names(raw))
        record = {k: v for k, v in codec._to_record(current).items() if k in names}
        steps = set(_avro_field_names(_nested_record(raw, "steps")))
        record["steps"] = [{k: v for k, v in step.items() if k in steps} for step in record["steps"]]
        request = set(_avro_field_names(_nested_record(raw, "request")))
        record["request"] = {k: v for k, v in record["request"].items() if k in request}
        record["schema_version"] = 1
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record)
        fingerprint = crc64_avro(canonical_form(raw).encode()).to_bytes(8, "little")
        assert fingerprint != _current("StateSnapshot").fingerprint

        decoded = codec.decode(b"\xc3\x01" + fingerprint + buf.getvalue())

        assert isinstance(decoded, StateSnapshot)
        assert decoded.plan is None and decoded.schema_version == 1
        assert decoded.step("enrich").output == current.step("enrich").output
        # Nor the governance fields (v4): an old snapshot decodes with none spent, none held, unsigned.
        fields_after_v3 = {
            "plan",
            "schema_version",
            "approvals",
            "decisions",
            "tool_calls",
            "tokens",
            "cost_usd",
            "tool_tokens",
            "tool_cost_usd",
            "signature",
        }
        assert decoded.model_dump(exclude=fields_after_v3) == current.model_dump(exclude=fields_after_v3)
        assert (decoded.approvals, decoded.decisions, decoded.tool_calls, decoded.signature) == ([], 0, 0, "")
    again = codec.decode(codec.encode(current))
    assert isinstance(again, StateSnapshot) and again.plan == current.plan


def _written_with(old: str, current: BaseModel, **fixed: Any) -> bytes:
    """``current`` as a writer with the history schema ``old`` would have written it (its fields only)."""
    raw = json.loads((SCHEMA_DIR / "history" / old).read_text())
    names = set(_avro_field_names(raw))
    record = {k: v for k, v in codec._to_record(current).items() if k in names}
    record.update(fixed)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(raw, _write_hint=False), record)
    fingerprint = crc64_avro(canonical_form(raw).encode()).to_bytes(8, "little")
    return b"\xc3\x01" + fingerprint + buf.getvalue()


def test_state_snapshot_written_with_the_v5_schema_decodes_with_no_tool_spending() -> None:
    """A snapshot from before the tools' part of the spending was kept apart (v5) decodes with 0 for it;
    the run's totals are kept."""
    current = next(m for m in SAMPLES if isinstance(m, StateSnapshot))
    assert current.tool_tokens == 420
    assert "tool_tokens" not in _avro_field_names(
        json.loads((SCHEMA_DIR / "history" / "StateSnapshot.v5.avsc").read_text())
    )
    decoded = codec.decode(_written_with("StateSnapshot.v5.avsc", current, schema_version=5))
    assert isinstance(decoded, StateSnapshot) and decoded.schema_version == 5
    assert (decoded.tool_tokens, decoded.tool_cost_usd) == (0, 0.0)
    assert (decoded.tokens, decoded.cost_usd) == (current.tokens, current.cost_usd)
    assert decoded.model_dump(exclude={"tool_tokens", "tool_cost_usd", "schema_version"}) == current.model_dump(
        exclude={"tool_tokens", "tool_cost_usd", "schema_version"}
    )


def test_tool_command_written_with_the_v4_schema_decodes_with_no_budget() -> None:
    """A command from before commands carried the run's model budget (v4) decodes with none: no cap."""
    current = next(m for m in SAMPLES if isinstance(m, ToolCommand))
    assert (current.budget_tokens, current.budget_cost_usd) == (5000, 0.05) and current.schema_version == 5
    decoded = codec.decode(_written_with("ToolCommand.v4.avsc", current, schema_version=4))
    assert isinstance(decoded, ToolCommand) and decoded.schema_version == 4
    assert (decoded.budget_tokens, decoded.budget_cost_usd) == (None, None)
    assert decoded.signature == current.signature and decoded.arguments == current.arguments


def test_child_run_fields_round_trip_and_older_versions_decode_without_them() -> None:
    """A child run's request (RunRequested v4) and snapshot (v7) carry the parent link; a request of v3, a
    snapshot of v6 and a result of v2 (no child tool calls) still decode, with no link and 0 calls."""
    request = next(m for m in SAMPLES if isinstance(m, RunRequested))
    child = request.model_copy(update={"parent_run_id": "p-1", "parent_step": "kyc", "parent_command_id": "c-9"})
    again = codec.decode(codec.encode(child))
    assert isinstance(again, RunRequested) and again.is_child and again.parent_command_id == "c-9"
    old = codec.decode(_written_with("RunRequested.v3.avsc", child, schema_version=3))
    assert isinstance(old, RunRequested) and not old.is_child and old.schema_version == 3
    snap = next(m for m in SAMPLES if isinstance(m, StateSnapshot))
    linked = snap.model_copy(update={"request": snap.request.model_copy(update={"parent_run_id": "p-1"})})
    again_snap = codec.decode(codec.encode(linked))
    assert isinstance(again_snap, StateSnapshot) and again_snap.request.parent_run_id == "p-1"
    old_snap = codec.decode(_written_with("StateSnapshot.v6.avsc", linked, schema_version=6))
    assert isinstance(old_snap, StateSnapshot) and old_snap.request.parent_run_id is None
    result = next(m for m in SAMPLES if isinstance(m, ToolResult)).model_copy(update={"tool_calls": 3})
    again_result = codec.decode(codec.encode(result))
    assert isinstance(again_result, ToolResult) and again_result.tool_calls == 3
    old_result = codec.decode(_written_with("ToolResult.v2.avsc", result, schema_version=2))
    assert isinstance(old_result, ToolResult) and old_result.tool_calls == 0


def test_a_cancelled_snapshot_round_trips_and_a_v7_one_decodes_uncancelled() -> None:
    snap = next(m for m in SAMPLES if isinstance(m, StateSnapshot)).model_copy(
        update={"cancelled": "cancelled by grace: the client withdrew"}
    )
    again = codec.decode(codec.encode(snap))
    assert isinstance(again, StateSnapshot) and again.cancelled == snap.cancelled
    old = codec.decode(_written_with("StateSnapshot.v7.avsc", snap, schema_version=7))
    assert isinstance(old, StateSnapshot) and old.cancelled is None and old.schema_version == 7


def test_cancelled_ends_round_trip_and_the_v8_snapshot_and_v1_ending_still_decode() -> None:
    snap = next(m for m in SAMPLES if isinstance(m, StateSnapshot)).model_copy(
        update={"status": RunStatus.cancelled, "cancelled": "cancelled by grace"}
    )
    again = codec.decode(codec.encode(snap))
    assert isinstance(again, StateSnapshot) and again.status is RunStatus.cancelled
    failed = snap.model_copy(update={"status": RunStatus.failed})
    old = codec.decode(_written_with("StateSnapshot.v8.avsc", failed, schema_version=8))
    assert isinstance(old, StateSnapshot) and old.status is RunStatus.failed and old.schema_version == 8
    ended = RunFailed(
        event_id="e", run_id="r", decision_id="d", status=FailureStatus.cancelled, reason="cancelled by grace"
    )
    back = codec.decode(codec.encode(ended))
    assert isinstance(back, RunFailed) and back.status is FailureStatus.cancelled and back.schema_version == 2
    was = ended.model_copy(update={"status": FailureStatus.failed})
    v1 = codec.decode(_written_with("RunFailed.v1.avsc", was, schema_version=1))
    assert isinstance(v1, RunFailed) and v1.status is FailureStatus.failed and v1.schema_version == 1


# -- decode errors -----------------------------------------------------------------------------------
def _current(name: str) -> codec.SchemaEntry:
    return codec.registry().current[f"io.streamagent.events.{name}"]


def _raw(name: str, record: dict[str, Any]) -> bytes:
    """An event written straight with fastavro and the current schema, bypassing the models."""
    entry = _current(name)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, entry.parsed, record)
    return b"\xc3\x01" + entry.fingerprint + buf.getvalue()


def _run_requested_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": "e-1",
        "run_id": RUN,
        "causation_id": None,
        "occurred_at": T0,
        "schema_version": 2,
        "company_name": "Globex",
        "company_domain": "globex.com",
        "contact_name": "Hank Scorpio",
        "contact_email": "hank@globex.com",
        "goal": "onboard new client",
        "requested_by": "crm",
        "deadline_s": None,
        "labels": {},
    }
    record.update(overrides)
    return record


def _decision_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": "e-2",
        "run_id": RUN,
        "occurred_at": T0,
        "decision_id": "d-1",
        "based_on_version": 1,
        "action": "dispatch",
        "reason": "r",
        "decider": "rules",
    }
    record.update(overrides)
    return record


def test_raw_fastavro_helpers_produce_decodable_events() -> None:
    """Control for the invalid-event cases below: the same records, made valid, decode."""
    assert isinstance(codec.decode(_raw("RunRequested", _run_requested_record())), RunRequested)
    decision = codec.decode(_raw("DecisionRecorded", _decision_record(arguments='{"a": 1}')))
    assert isinstance(decision, DecisionRecorded)
    assert decision.arguments == {"a": 1}


GOOD = codec.encode(SAMPLES[0])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(None, "empty", id="none"),
        pytest.param(b"", "empty", id="empty-bytes"),
        pytest.param(b"hello, this is not avro at all", "not-avro", id="garbage"),
        pytest.param(b"\xc3\x01\x00\x01", "not-avro", id="header-too-short"),
        pytest.param(b"\xc3\x02" + GOOD[2:], "not-avro", id="wrong-magic"),
        pytest.param(b'{"run_id": "r-1", "type": "RunRequested"}', "not-avro", id="json"),
        pytest.param(b"\xc3\x01" + b"\x00" * 8 + GOOD[10:], "unknown-schema", id="unknown-fingerprint"),
        pytest.param(GOOD[:-7], "corrupt-body", id="truncated-body"),
        pytest.param(GOOD[:10], "corrupt-body", id="header-only"),
        pytest.param(GOOD[:10] + b"\xff" * 40, "corrupt-body", id="garbage-body"),
        pytest.param(
            _raw("RunRequested", _run_requested_record(contact_email="not-an-email")),
            "invalid-event",
            id="invalid-email",
        ),
        pytest.param(
            _raw("RunRequested", _run_requested_record(company_domain="localhost")),
            "invalid-event",
            id="invalid-domain",
        ),
        pytest.param(_raw("RunRequested", _run_requested_record(run_id="")), "invalid-event", id="empty-run-id"),
        pytest.param(
            _raw("DecisionRecorded", _decision_record(arguments="{not json")),
            "invalid-event",
            id="arguments-not-json",
        ),
        pytest.param(
            _raw("DecisionRecorded", _decision_record(context="[1, 2]")),
            "invalid-event",
            id="context-not-an-object",
        ),
    ],
)
def test_decode_errors_carry_a_stable_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(codec.DecodeError) as info:
        codec.decode(data)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")
    assert info.value.detail


def test_good_bytes_used_for_the_error_cases_decode() -> None:
    assert codec.decode(GOOD) == SAMPLES[0]


# -- schemas and models ------------------------------------------------------------------------------
def test_every_current_schema_has_a_model_and_every_model_a_schema() -> None:
    registry = codec.SchemaRegistry()
    model_names = {m.SCHEMA_NAME for m in ALL_MODELS}  # type: ignore[attr-defined]
    assert set(registry.current) == model_names
    file_names = {f"{raw['namespace']}.{raw['name']}" for raw in (json.loads(p.read_text()) for p in CURRENT_SCHEMAS)}
    assert file_names == model_names
    # Every schema file (current and history) is known by its fingerprint.
    assert len(registry.by_fingerprint) == len(ALL_SCHEMAS)


def test_registry_refuses_a_schema_directory_missing_a_model(tmp_path: Path) -> None:
    for path in CURRENT_SCHEMAS:
        if path.name != "ToolResult.avsc":
            shutil.copy(path, tmp_path / path.name)
    with pytest.raises(RuntimeError, match=r"ToolResult"):
        codec.SchemaRegistry(tmp_path)


def _avro_field_names(record: dict[str, Any]) -> list[str]:
    return [f["name"] for f in record["fields"]]


def _nested_record(record: dict[str, Any], field: str) -> dict[str, Any]:
    kind: dict[str, Any] = next(f["type"] for f in record["fields"] if f["name"] == field)
    nested: dict[str, Any] = kind["items"] if kind["type"] == "array" else kind
    return nested


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_model_fields_match_the_avro_record(model: type[BaseModel]) -> None:
    path = SCHEMA_DIR / f"{model.__name__}.avsc"
    raw = json.loads(path.read_text())
    assert f"{raw['namespace']}.{raw['name']}" == model.SCHEMA_NAME  # type: ignore[attr-defined]
    assert sorted(model.model_fields) == sorted(_avro_field_names(raw))
    if model is StateSnapshot:
        assert sorted(OnboardingRequest.model_fields) == sorted(_avro_field_names(_nested_record(raw, "request")))
        assert sorted(StepState.model_fields) == sorted(_avro_field_names(_nested_record(raw, "steps")))


@pytest.mark.parametrize(
    ("model", "field", "enum_type"),
    [
        (DecisionRecorded, "action", DecisionAction),
        (RunFailed, "status", FailureStatus),
        (ToolResult, "status", ToolStatus),
        (StateSnapshot, "status", RunStatus),
    ],
)
def test_avro_enum_symbols_match_the_python_enums(model: type[BaseModel], field: str, enum_type: Any) -> None:
    raw = json.loads((SCHEMA_DIR / f"{model.__name__}.avsc").read_text())
    kind = next(f["type"] for f in raw["fields"] if f["name"] == field)
    assert kind["symbols"] == [member.value for member in enum_type]


@pytest.mark.parametrize(("partition", "offset"), [(0, 0), (3, 41), (7, 2**40 + 5), (63, 300)])
def test_with_landing_equals_encoding_the_fields(partition: int, offset: int) -> None:
    record = next(m for m in SAMPLES if isinstance(m, DecisionRecorded))
    patched = codec.with_landing(codec.encode(record), partition, offset)
    expected = record.model_copy(update={"command_partition": partition, "command_offset": offset})
    assert patched == codec.encode(expected)
    assert codec.decode(patched) == expected
