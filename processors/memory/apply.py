"""What one write does to an entity: a pure function of the entity's last version and the write.

The memory processor owns each key's partition, so it applies every change of an entity in the order
intake admitted them, and checks each against what it was based on (``expected_version``): a writer that
read v3 cannot overwrite v4 without having seen it. A deletion is a version too (``deleted``), so version
numbers never go back and a decision that saw v3 of an entity deleted since is told so, not fooled by a
new v1.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from streamagent.events import EntityVersion, MemoryWrite

# How many write ids a version remembers: a write delivered again after as many later writes to the same
# key is applied again. Intake redelivers only what it had not committed (one batch), so 32 is ample.
RECENT_WRITES = 32


@dataclass(frozen=True)
class Applied:
    outcome: Literal["applied", "duplicate", "conflict"]
    version: EntityVersion | None = None
    detail: str = ""


def current_version(last: EntityVersion | None) -> int:
    """The version a writer sees: 0 for an entity that does not exist (never written, or deleted)."""
    return 0 if last is None or last.deleted else last.version


def apply(last: EntityVersion | None, write: MemoryWrite, at: datetime) -> Applied:
    if last is not None and write.write_id in last.recent_writes:
        return Applied("duplicate", last)
    seen = current_version(last)
    if write.expected_version is not None and write.expected_version != seen:
        now_text = f"v{seen}" if seen else "no such entity"
        return Applied(
            "conflict",
            last,
            f"{write.ref}: the write expected v{write.expected_version}, memory has {now_text}"
            f" (by {last.writer if last else 'nobody'}); read it again and write on the current version",
        )
    if write.delete and seen == 0:
        return Applied("duplicate", last)  # deleting what does not exist changes nothing
    fields = {} if write.delete or last is None or last.deleted else dict(last.fields)
    fields.update(write.set)
    for name in write.unset:
        fields.pop(name, None)
    recent = [*(last.recent_writes if last is not None else []), write.write_id][-RECENT_WRITES:]
    version = EntityVersion(
        entity=write.entity,
        key=write.key,
        version=(last.version if last is not None else 0) + 1,
        fields=fields,
        deleted=write.delete,
        as_of=at,
        writer=write.writer,
        write_id=write.write_id,
        recent_writes=recent,
    )
    return Applied("applied", version)
