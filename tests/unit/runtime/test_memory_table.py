"""The memory table folds the memory topic: the last version per entity, deletions and tombstones remove an
entity (its version stays for the writer), a version not signed by the memory processor is skipped where
the keys are held, and every change is noted once for the memory watch."""

from __future__ import annotations

from datetime import UTC, datetime

from helpers import TEST_COMMAND_KEYS
from pydantic import SecretStr

from streamagent import codec
from streamagent.authn import MEMORY, Authenticator, issue
from streamagent.config import Settings
from streamagent.events import EntityVersion
from streamagent.memory import MemoryTable, stale
from streamagent.signing import load_keys

AT = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
SETTINGS = Settings(command_keys=SecretStr(TEST_COMMAND_KEYS))


def _version(version: int, deleted: bool = False, **fields: object) -> EntityVersion:
    return EntityVersion(
        entity="contact",
        key="acme.io",
        version=version,
        fields=fields,
        deleted=deleted,
        as_of=AT,
        writer="crm",
        write_id=f"w{version}",
    )


def test_the_last_version_wins_and_a_deletion_or_a_tombstone_removes_the_entity() -> None:
    table = MemoryTable(SETTINGS)
    table._apply(b"contact/acme.io", codec.encode(_version(1, email="a@acme.io")))
    table._apply(b"contact/acme.io", codec.encode(_version(2, email="b@acme.io")))
    assert table.get("contact", "acme.io").fields == {"email": "b@acme.io"}  # type: ignore[union-attr]
    assert table.version("contact/acme.io") == 2 and set(table.take_changes()) == {"contact/acme.io"}
    assert table.take_changes() == {}  # noted once
    assert stale(table, {"contact/acme.io": 1}) == ["contact/acme.io v1 → v2"]
    assert stale(table, {"contact/acme.io": 2}) == []
    table._apply(b"contact/acme.io", codec.encode(_version(3, deleted=True)))
    assert table.get("contact", "acme.io") is None and table.version("contact/acme.io") == 0
    assert table.last("contact/acme.io").version == 3  # type: ignore[union-attr]  # the writer counts on from it
    assert stale(table, {"contact/acme.io": 2}) == ["contact/acme.io v2 → deleted"]
    table._apply(b"contact/acme.io", None)  # a Kafka tombstone: gone for every reader
    assert table.last("contact/acme.io") is None and "contact/acme.io" in table.take_changes()


def test_a_version_not_signed_by_the_memory_processor_is_skipped_where_the_keys_are_held() -> None:
    pipeline = load_keys(SETTINGS)
    table = MemoryTable(SETTINGS, authenticator=Authenticator(pipeline))
    forged = codec.encode(_version(7, email="evil@example.com"))
    table._apply(b"contact/acme.io", forged, [])
    table._apply(b"contact/acme.io", forged, issue(pipeline, "intake").headers(forged))
    assert table.get("contact", "acme.io") is None and table.rejected == 2
    table._apply(b"contact/acme.io", forged, issue(pipeline, MEMORY).headers(forged))
    assert table.version("contact/acme.io") == 7
