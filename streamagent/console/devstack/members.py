"""How many members of each group the stack runs (``STREAMAGENT_STACK_MEMBERS``), and their names.

``state=2,decision=2,projection=1,tools=2,jira=3``: a processor's name, ``tools`` for every tool, or
one tool's name (which wins over ``tools``). Each member is its own process, named after its group
(``processor-decision``, then ``processor-decision-2``, ...): the name is its instance id, so a member
restarted by the supervisor comes back as itself (static membership on Kafka).
"""

from __future__ import annotations

from streamagent.config import env_name

TOOLS = "tools"


class MembersError(ValueError):
    """``STREAMAGENT_STACK_MEMBERS`` is malformed or names no group the stack runs."""


def parse_members(value: str, processors: tuple[str, ...], tools: tuple[str, ...]) -> dict[str, int]:
    """Members per child base name (``processor-decision``, ``tool-jira``); every group at least one."""
    var = env_name("stack_members")
    counts: dict[str, int] = {f"processor-{p}": 1 for p in processors}
    counts.update({f"tool-{t}": 1 for t in tools})
    every_tool: int | None = None
    per_tool: dict[str, int] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        group, sep, number = part.partition("=")
        group = group.strip()
        if not sep or not number.strip().isdigit() or int(number) < 1:
            raise MembersError(f"{var}: {part!r} is not group=count with a count of 1 or more (e.g. decision=2)")
        count = int(number)
        if group == TOOLS:
            every_tool = count
        elif group in processors:
            counts[f"processor-{group}"] = count
        elif group in tools:
            per_tool[group] = count
        else:
            known = ", ".join([*processors, TOOLS, *tools])
            raise MembersError(f"{var} names {group!r}, which this stack does not run; known: {known}")
    for tool in tools:
        counts[f"tool-{tool}"] = per_tool.get(tool, every_tool or 1)
    return counts


def member_name(base: str, index: int) -> str:
    """The first member keeps the group's plain name (as with one member), the others are numbered."""
    return base if index == 1 else f"{base}-{index}"


def group_of(name: str, bases: set[str]) -> str:
    """The base name of a member's process name (``processor-decision-2`` -> ``processor-decision``)."""
    if name in bases:
        return name
    head, _, tail = name.rpartition("-")
    return head if tail.isdigit() and head in bases else name
