"""The catalogue fold: registry messages in, a table of tools out (no broker)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel
from streamagent.tools.enrich import Enrich

from streamagent.catalogue import Announcement, Catalogue, CatalogueState, ToolCatalogue
from streamagent.config import Settings

LEASE = 15_000


def up(
    member: str, at: int, *, tool: type[Any] = Enrich, state: str = "up", started: int | None = None
) -> Announcement:
    """``member``'s announcement sent at ``at`` (a heartbeat when ``started`` is earlier)."""
    return tool.declaration(member_id=member, state=state, at_ms=at, started_at_ms=started or at, lease_ms=LEASE)


def feed(state: CatalogueState, *announcements: Announcement) -> list[str]:
    return [state.apply(a.key(), a.encode()).outcome for a in announcements]


class OtherInput(BaseModel):
    url: str


class Impostor(Enrich):  # the same name, another input schema
    input_model = OtherInput
    version = "9"


def test_an_announced_tool_is_available_with_its_member() -> None:
    state = CatalogueState()
    assert feed(state, up("m1", 1000)) == ["ok"]
    entry = state.entry("enrich", now_ms=1000)
    assert entry is not None and entry.status == "available" and entry.available
    assert [m.member_id for m in entry.members] == ["m1"]
    assert entry.input_schema == Enrich.input_model.model_json_schema()
    assert entry.requires_approval is False and entry.version == "1"
    assert state.entry("crm", now_ms=1000) is None


def test_heartbeats_keep_a_member_live_and_a_lapsed_lease_makes_the_tool_unavailable() -> None:
    state = CatalogueState()
    feed(state, up("m1", 1000), up("m1", 6000, started=1000), up("m1", 11000, started=1000))
    assert state.entry("enrich", now_ms=11000 + LEASE - 1).available  # type: ignore[union-attr]
    entry = state.entry("enrich", now_ms=11000 + LEASE)
    assert entry is not None and entry.status == "unavailable" and entry.members == ()
    # The definition stays: the tool is known, just not running.
    assert entry.input_schema == Enrich.input_model.model_json_schema()
    feed(state, up("m1", 40000))
    assert state.entry("enrich", now_ms=40000).available  # type: ignore[union-attr]


def test_a_leaving_member_goes_at_once_and_the_others_stay() -> None:
    state = CatalogueState()
    feed(state, up("m1", 1000), up("m2", 1000))
    assert [m.member_id for m in state.entry("enrich", 1000).members] == ["m1", "m2"]  # type: ignore[union-attr]
    feed(state, up("m1", 2000, state="left"))
    entry = state.entry("enrich", 2000)
    assert entry is not None and [m.member_id for m in entry.members] == ["m2"] and entry.available
    feed(state, up("m2", 3000, state="left"))
    assert state.entry("enrich", 3000).status == "unavailable"  # type: ignore[union-attr]


def test_a_different_input_schema_is_refused_while_the_owner_is_live(caplog: pytest.LogCaptureFixture) -> None:
    state = CatalogueState()
    feed(state, up("m1", 1000))
    with caplog.at_level(logging.ERROR, logger="streamagent.catalogue"):
        heartbeats = up("x1", 2000, tool=Impostor), up("x1", 7000, tool=Impostor, started=2000)
        assert feed(state, *heartbeats) == ["refused", "refused"]
    refusals = [r for r in caplog.records if "refused tool announcement" in r.getMessage()]
    assert len(refusals) == 1  # once per member, not once per heartbeat
    assert "enrich" in refusals[0].getMessage()
    entry = state.entry("enrich", 7000)
    assert entry is not None and entry.version == "1"  # the first keeps the name
    assert entry.input_schema == Enrich.input_model.model_json_schema()
    assert [m.member_id for m in entry.members] == ["m1"] and entry.refused == ("x1",)


def test_the_same_schema_in_a_new_version_joins_the_owner() -> None:
    class Enrich2(Enrich):
        version = "2"
        description = "Look up a company (v2)"

    state = CatalogueState()
    assert feed(state, up("m1", 1000), up("m2", 2000, tool=Enrich2)) == ["ok", "ok"]
    entry = state.entry("enrich", 2000)
    assert entry is not None and entry.version == "2" and entry.description == "Look up a company (v2)"
    assert {(m.member_id, m.version) for m in entry.members} == {("m1", "1"), ("m2", "2")}


def test_another_schema_takes_a_name_over_once_the_owner_has_no_live_member() -> None:
    state = CatalogueState()
    feed(state, up("m1", 1000))
    assert feed(state, up("x1", 1000 + LEASE, tool=Impostor)) == ["ok"]  # m1's lease has lapsed
    entry = state.entry("enrich", 1000 + LEASE)
    assert entry is not None and entry.version == "9" and entry.input_schema == OtherInput.model_json_schema()
    # ...and now the old schema is the one refused while the new owner lives.
    assert feed(state, up("m1", 2000 + LEASE)) == ["refused"]


def test_a_member_restarted_with_another_schema_replaces_its_own_announcement() -> None:
    # A crashed member (no leave) comes back under the same member id with an incompatible version:
    # its own earlier announcement does not hold the name against it.
    state = CatalogueState()
    feed(state, up("m1", 1000))
    assert feed(state, up("m1", 2000, tool=Impostor)) == ["ok"]
    entry = state.entry("enrich", 2000)
    assert entry is not None and entry.version == "9" and [m.member_id for m in entry.members] == ["m1"]


def test_a_cold_read_reaches_the_same_table_as_a_live_reader() -> None:
    messages = [
        up("m1", 1000),
        up("x1", 2000, tool=Impostor),
        up("m1", 6000, started=1000),
        up("m2", 7000, state="left"),
    ]
    live, cold = CatalogueState(), CatalogueState()
    for a in messages:
        live.apply(a.key(), a.encode())
    # Compaction keeps the last value per key, in offset order.
    last = {a.key(): a for a in messages}
    for a in sorted(last.values(), key=messages.index):
        cold.apply(a.key(), a.encode())
    assert live.entries(8000) == cold.entries(8000)


def test_an_undecodable_message_is_rejected_and_the_last_good_entry_is_kept() -> None:
    state = CatalogueState()
    feed(state, up("m1", 1000))
    before = state.entries(1000)
    for key, value, reason in [
        (b"enrich/m1", b"\xc3\x01garbage", "not-json"),
        (b"enrich/m1", b"[1, 2]", "invalid-announcement"),
        (b"enrich/m1", b'{"name": "enrich"}', "invalid-announcement"),
        (b"enrich/m9", up("m1", 2000).encode(), "key-mismatch"),
    ]:
        applied = state.apply(key, value)
        assert (applied.outcome, applied.reason) == ("rejected", reason)
    assert state.entries(1000) == before


def test_the_original_member_less_announcement_still_describes_a_tool() -> None:
    state = CatalogueState()
    legacy = Enrich().announcement()
    assert state.apply(b"enrich", Announcement.model_validate(legacy).encode(), received_ms=1000).outcome == "ok"
    entry = state.entry("enrich", 1000)
    assert entry is not None and entry.status == "unavailable" and entry.members == ()


def test_a_tombstone_removes_its_member() -> None:
    state = CatalogueState()
    feed(state, up("m1", 1000))
    assert state.apply(b"enrich/m1", None).outcome == "ok"
    assert state.entry("enrich", 1000).status == "unavailable"  # type: ignore[union-attr]


# -- the Kafka-facing wrapper, with a stand-in for confluent's messages --------------------------------
@dataclass
class FakeMessage:
    _key: bytes | None
    _value: bytes | None
    _offset: int
    _topic: str = "agent.tools.registry"

    def error(self) -> None:
        return None

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def offset(self) -> int:
        return self._offset

    def partition(self) -> int:
        return 0

    def topic(self) -> str:
        return self._topic

    def timestamp(self) -> tuple[int, int]:
        return (1, 1000)


class FakeSink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, int, bytes | None, bytes | None, str, str]] = []

    def send_raw(self, *args: Any) -> None:
        self.sent.append(args)  # type: ignore[arg-type]


def test_the_catalogue_dead_letters_what_does_not_decode_and_keeps_the_last_good_entry() -> None:
    sink = FakeSink()
    catalogue = Catalogue(Settings(), dead_letters=sink)
    good = up("m1", 1000)
    catalogue._fold([FakeMessage(good.key(), good.encode(), 0), FakeMessage(b"enrich/m1", b"{oops", 1)])
    assert [(s[2], s[5]) for s in sink.sent] == [(1, "not-json")]
    assert sink.sent[0][4] == b"{oops"  # the original bytes, for `dlq replay`
    assert catalogue.rejected == [(0, 1, "not-json", catalogue.rejected[0][3])]
    entry = catalogue.state.entry("enrich", 1000)
    assert entry is not None and entry.available and entry.version == "1"


def test_available_answers_none_for_an_unknown_or_unavailable_tool() -> None:
    catalogue: ToolCatalogue = Catalogue(Settings())
    assert catalogue.available("enrich") is None
    stale = up("m1", 1000)  # its lease ran out decades ago, by the wall clock
    catalogue._fold([FakeMessage(stale.key(), stale.encode(), 0)])  # type: ignore[attr-defined]
    assert catalogue.available("enrich") is None
    assert [(e.name, e.status) for e in catalogue.entries()] == [("enrich", "unavailable")]
