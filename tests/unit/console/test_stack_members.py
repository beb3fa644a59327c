"""STREAMAGENT_STACK_MEMBERS, member names, the {host} instance id, and `status` from announcements."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from streamagent.config import SettingsError, settings_from
from streamagent.console.devstack.members import MembersError, group_of, member_name, parse_members
from streamagent.console.status import group_rows, render
from streamagent.members import MemberStatus, PartitionStatus, fold_members

PROCESSORS = ("intake", "memory", "state", "decision", "projection")
TOOLS = ("enrich", "jira", "email", "slack")


def test_members_per_group_default_to_one_and_a_tool_wins_over_tools() -> None:
    counts = parse_members("state=2, decision=3,tools=2,jira=4", PROCESSORS, TOOLS)
    assert counts["processor-state"] == 2
    assert counts["processor-decision"] == 3
    assert counts["processor-intake"] == 1
    assert counts["tool-enrich"] == 2
    assert counts["tool-jira"] == 4
    assert parse_members("", PROCESSORS, TOOLS) == {
        **{f"processor-{p}": 1 for p in PROCESSORS},
        **{f"tool-{t}": 1 for t in TOOLS},
    }


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("decision", "is not group=count"),
        ("decision=0", "is not group=count"),
        ("decision=two", "is not group=count"),
        ("nosuch=2", "names 'nosuch', which this stack does not run"),
    ],
)
def test_a_malformed_members_setting_is_refused_naming_the_variable(value: str, says: str) -> None:
    with pytest.raises(MembersError) as err:
        parse_members(value, PROCESSORS, TOOLS)
    assert "STREAMAGENT_STACK_MEMBERS" in str(err.value) and says in str(err.value)


def test_member_names_number_every_member_after_the_first() -> None:
    assert [member_name("processor-decision", i) for i in (1, 2, 3)] == [
        "processor-decision",
        "processor-decision-2",
        "processor-decision-3",
    ]
    bases = {"processor-decision", "tool-jira"}
    assert group_of("processor-decision-2", bases) == "processor-decision"
    assert group_of("tool-jira", bases) == "tool-jira"
    assert group_of("sandbox", bases) == "sandbox"


def test_host_in_an_instance_id_is_the_containers_hostname() -> None:
    s = settings_from({"STREAMAGENT_GROUP_INSTANCE_ID": "decision-{host}", "STREAMAGENT_INSTANCE_ID": "d-{host}"})
    assert s.group_instance_id == f"decision-{socket.gethostname()}"
    assert s.instance_id == f"d-{socket.gethostname()}"


def test_member_settings_are_checked() -> None:
    with pytest.raises(SettingsError, match="STREAMAGENT_MEMBER_REPORT_S"):
        settings_from({"STREAMAGENT_MEMBER_REPORT_S": "0"})


def _status(member: str, partitions: list[int], at_ms: int, state: str = "up", lag: int = 3) -> MemberStatus:
    return MemberStatus(
        group="decision",
        member=member,
        host="h",
        pid=1,
        state=state,  # type: ignore[arg-type]
        partitions=[PartitionStatus(topic="agent.run.state", partition=p, position=10, lag=lag) for p in partitions],
        processed=7,
        started_at_ms=0,
        at_ms=at_ms,
        lease_ms=15_000,
    )


def test_status_keeps_the_last_announcement_per_member_and_shows_silent_ones_gone() -> None:
    now = 100_000
    old = _status("processor-decision", [0, 1, 2, 3], now - 50_000)
    latest = [
        _status("processor-decision", [0, 1], now - 1_000),
        _status("processor-decision-2", [2, 3], now - 1_000),
        _status("processor-decision-3", [1], now - 60_000),
    ]
    records = [(s.key(), s.model_dump_json().encode()) for s in (old, *latest)]
    records.append((b"decision/garbage", b"{not json"))
    members = fold_members(records)
    assert set(members) == {
        "decision/processor-decision",
        "decision/processor-decision-2",
        "decision/processor-decision-3",
    }
    (row,) = group_rows(members, now)
    assert row["live_members"] == 2 and row["partitions_owned"] == 4 and row["lag"] == 12
    gone = [m for m in row["members"] if m["state"] == "gone"]
    assert [m["member"] for m in gone] == ["processor-decision-3"] and gone[0]["partitions"] == []
    table = render([row])
    assert "processor-decision-2" in table and "run.state 2,3" in table and "gone (60s)" in table


class _Proc:
    def __init__(self, alive: bool) -> None:
        self.alive = alive

    def poll(self) -> int | None:
        return None if self.alive else -9


def test_a_killed_member_waits_for_its_takeover_only_while_others_of_its_group_work(
    tmp_path: Path,
) -> None:
    from streamagent.console.devstack.stack import Child, Stack

    def child(name: str, alive: bool, static: bool = False) -> Child:
        c = Child(name, ["x"], {}, tmp_path / f"{name}.log", static=static)
        c.proc = _Proc(alive)  # type: ignore[assignment]
        return c

    stack = Stack.__new__(Stack)
    stack.settings = settings_from(
        {"STREAMAGENT_SESSION_TIMEOUT_MS": "6000", "STREAMAGENT_STATE_SESSION_TIMEOUT_MS": "2000"}
    )
    stack.children = {
        c.name: c
        for c in (
            child("tool-jira", True),
            child("tool-jira-2", False),
            child("processor-state", True),
            child("processor-state-2", False),
            child("processor-decision", False, static=True),
            child("tool-email-2", False),
        )
    }
    outlives = stack._membership_outlives_s
    # Its session, a survivor's heartbeat (500 ms), and half a second: joining before the expiry, the
    # successor would start a rebalance that still lists the dead member; it joins the survivors' own.
    assert outlives(stack.children["tool-jira-2"]) == 6.0 + 0.5 + 0.5
    # The state group's own session, its heartbeat (at most a third of it), and a faust takeover's recovery.
    assert outlives(stack.children["processor-state-2"]) == pytest.approx(2.0 + 0.5 + 6.0)
    assert outlives(stack.children["processor-decision"]) == 0.0  # static, alone: back at once
    assert outlives(stack.children["tool-email-2"]) == 0.0  # nobody else of its group to stop
