"""`streamagent status`: every consumer group's members, the partitions each owns, its lag and its work.

Read from the members topic (``streamagent.members``), where each member announces itself, because
Kafka's DescribeConsumerGroups shows no members on the embedded broker and its ListOffsets high-water
mark is wrong there (BROKER-NOTES). A member unheard of for ``member_lease_s`` (killed, or its machine
gone) is shown as ``gone``, as is one that announced it left; a partition no live member claims is
listed as unowned for the groups that have a live member.
"""

from __future__ import annotations

import time
from typing import Any

from streamagent.config import Settings
from streamagent.members import MemberStatus, read_members


def group_rows(members: dict[str, MemberStatus], now_ms: int) -> list[dict[str, Any]]:
    """One entry per group, its members sorted by name, the live ones first."""
    groups: dict[str, list[MemberStatus]] = {}
    for status in members.values():
        groups.setdefault(status.group, []).append(status)
    out = []
    for group in sorted(groups):
        listed = sorted(groups[group], key=lambda m: (m.gone(now_ms), m.member))
        live = [m for m in listed if not m.gone(now_ms)]
        owned = {(p.topic, p.partition) for m in live for p in m.partitions}
        lags = [m.lag for m in live if m.lag is not None]
        out.append(
            {
                "group": group,
                "live_members": len(live),
                "partitions_owned": len(owned),
                "lag": sum(lags) if lags else None,
                "members": [
                    {
                        "member": m.member,
                        "state": "gone" if m.gone(now_ms) else "up",
                        "host": m.host,
                        "pid": m.pid,
                        "partitions": [
                            {"topic": p.topic, "partition": p.partition, "lag": p.lag, "position": p.position}
                            for p in m.partitions
                        ]
                        if not m.gone(now_ms)
                        else [],
                        "lag": m.lag if not m.gone(now_ms) else None,
                        "processed": m.processed,
                        "rebalances": m.rebalances,
                        "seen_s_ago": round(max(0, now_ms - m.at_ms) / 1000, 1),
                        "up_s": round(max(0, m.at_ms - m.started_at_ms) / 1000, 1),
                    }
                    for m in listed
                ],
            }
        )
    return out


def _partitions(parts: list[dict[str, Any]], prefix: str) -> str:
    """``events 0,2 results 0,2``: partitions per topic (the topic prefix of a test stack left out)."""
    by_topic: dict[str, list[int]] = {}
    for p in parts:
        topic = p["topic"].removeprefix(prefix).removeprefix("agent.")
        by_topic.setdefault(topic, []).append(p["partition"])
    return " ".join(f"{t} {','.join(map(str, sorted(ps)))}" for t, ps in sorted(by_topic.items())) or "-"


def render(rows: list[dict[str, Any]], prefix: str = "") -> str:
    if not rows:
        return "no member has announced itself yet (is a stack running? members announce within seconds of start)"
    lines = [f"{'group':<16} {'member':<26} {'state':<5} {'lag':>7} {'processed':>10}  partitions"]
    for row in rows:
        for m in row["members"]:
            lag = "-" if m["lag"] is None else str(m["lag"])
            state = m["state"] if m["state"] == "up" else f"gone ({m['seen_s_ago']:.0f}s)"
            lines.append(
                f"{row['group']:<16} {m['member'][:26]:<26} {state:<5} {lag:>7} {m['processed']:>10}"
                f"  {_partitions(m['partitions'], prefix)}"
            )
    return "\n".join(lines)


def status(settings: Settings, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    return group_rows(read_members(settings, timeout_s), int(time.time() * 1000))
