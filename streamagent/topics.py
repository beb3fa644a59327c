"""Every topic the runtime uses, declared once."""

from __future__ import annotations

from dataclasses import dataclass

from streamagent.config import Settings

# Upstream systems write requests here and nowhere else; intake validates them and appends the run log.
RUN_REQUESTS = "agent.run.requests"
RUN_EVENTS = "agent.run.events"
TOOL_RESULTS = "agent.tool.results"
RUN_STATE = "agent.run.state"
TOOL_REGISTRY = "agent.tools.registry"
DEAD_LETTERS = "agent.dlq"
COMMANDS_PREFIX = "agent.tool.commands."
# Memory: upstream systems and operators ask for changes of shared entities here (intake validates them),
MEMORY_REQUESTS = "agent.memory.requests"
# intake appends what it admitted here, keyed by entity, for the memory processor, the one writer of a key,
MEMORY_WRITES = "agent.memory.writes"
# which publishes each entity's versions here (compacted: the table every reader folds).
MEMORY = "agent.memory"
# Every consumer-group member announces here, keyed by group and member, which partitions it owns, its
# lag and how much it has done (compacted: `streamagent status` folds the last announcement per key).
MEMBERS = "agent.members"


def command_topic(tool: str) -> str:
    return COMMANDS_PREFIX + tool


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False
    # Dead letters keep every byte of what failed, which can be large.
    max_message_bytes: int = 8 * 1024 * 1024

    def config(self) -> dict[str, str]:
        return {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "max.message.bytes": str(self.max_message_bytes),
        }


def all_topics(tools: tuple[str, ...] = ()) -> list[TopicSpec]:
    """The runtime's topics, and the command topics of ``tools`` (a tool also creates its own at start:
    the runtime names no tool)."""
    specs = [
        TopicSpec(RUN_REQUESTS),
        TopicSpec(RUN_EVENTS),
        TopicSpec(TOOL_RESULTS),
        TopicSpec(RUN_STATE, compacted=True),
        TopicSpec(TOOL_REGISTRY, compacted=True),
        TopicSpec(DEAD_LETTERS),
        TopicSpec(MEMORY_REQUESTS),
        TopicSpec(MEMORY_WRITES),
        TopicSpec(MEMORY, compacted=True),
        TopicSpec(MEMBERS, compacted=True),
    ]
    specs += [TopicSpec(command_topic(t)) for t in tools]
    return specs


def physical(settings: Settings, specs: list[TopicSpec]) -> list[TopicSpec]:
    return [TopicSpec(settings.topic(s.name), s.compacted, s.max_message_bytes) for s in specs]
