"""What one write does to an entity: versions counted on, checked against what the writer read, applied once."""

from __future__ import annotations

from datetime import UTC, datetime

from streamagent.processors.memory.apply import RECENT_WRITES, apply

from streamagent.events import MemoryWrite

AT = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _write(write_id: str, **fields: object) -> MemoryWrite:
    return MemoryWrite(write_id=write_id, entity="contact", key="acme.io", writer="crm", **fields)  # type: ignore[arg-type]


def test_writes_merge_fields_and_count_versions_on() -> None:
    first = apply(None, _write("w1", set={"email": "a@acme.io", "name": "Ada"}), AT)
    assert first.outcome == "applied" and first.version is not None
    assert (first.version.version, first.version.fields) == (1, {"email": "a@acme.io", "name": "Ada"})
    second = apply(first.version, _write("w2", set={"email": "b@acme.io"}, unset=["name"]), AT)
    assert second.version is not None
    assert (second.version.version, second.version.fields) == (2, {"email": "b@acme.io"})
    assert second.version.recent_writes == ["w1", "w2"] and second.version.writer == "crm"


def test_a_write_delivered_again_is_applied_once() -> None:
    first = apply(None, _write("w1", set={"email": "a@acme.io"}), AT).version
    later = apply(first, _write("w2", set={"seats": 3}), AT).version
    again = apply(later, _write("w1", set={"email": "a@acme.io"}), AT)
    assert again.outcome == "duplicate" and again.version is later


def test_a_write_based_on_an_old_version_is_a_conflict_naming_both() -> None:
    v1 = apply(None, _write("w1", set={"email": "a@acme.io"}), AT).version
    v2 = apply(v1, _write("w2", set={"email": "b@acme.io"}, expected_version=1), AT).version
    late = apply(v2, _write("w3", set={"email": "c@acme.io"}, expected_version=1), AT)
    assert late.outcome == "conflict" and late.version is v2
    assert "expected v1, memory has v2" in late.detail
    assert apply(None, _write("w4", set={"a": 1}, expected_version=2), AT).outcome == "conflict"
    assert apply(None, _write("w5", set={"a": 1}, expected_version=0), AT).outcome == "applied"


def test_a_deletion_is_a_version_and_versions_never_go_back() -> None:
    v1 = apply(None, _write("w1", set={"email": "a@acme.io"}), AT).version
    gone = apply(v1, _write("w2", delete=True), AT).version
    assert gone is not None and gone.deleted and gone.version == 2 and gone.fields == {}
    assert apply(gone, _write("w3", delete=True), AT).outcome == "duplicate"  # nothing left to delete
    back = apply(gone, _write("w4", set={"email": "z@acme.io"}, expected_version=0), AT).version
    assert back is not None and back.version == 3 and back.fields == {"email": "z@acme.io"}


def test_only_the_last_writes_are_remembered() -> None:
    version = None
    for i in range(RECENT_WRITES + 5):
        version = apply(version, _write(f"w{i}", set={"n": i}), AT).version
    assert version is not None and len(version.recent_writes) == RECENT_WRITES
    assert version.recent_writes[-1] == f"w{RECENT_WRITES + 4}"
