"""Which offset of a partition may be committed while commands finish out of order."""

from __future__ import annotations


class PartitionOffsets:
    """Commands of one partition run concurrently; only the contiguous done prefix is committable."""

    def __init__(self) -> None:
        self.in_flight: set[int] = set()
        self.next_offset: int | None = None  # one past the highest offset received
        self.committed: int | None = None

    def received(self, offset: int) -> None:
        self.in_flight.add(offset)
        self.next_offset = max(self.next_offset or 0, offset + 1)

    def done(self, offset: int) -> None:
        self.in_flight.discard(offset)

    def committable(self) -> int | None:
        """The offset to commit now, or None if nothing new is safe to commit."""
        if self.next_offset is None:
            return None
        candidate = min(self.in_flight) if self.in_flight else self.next_offset
        if self.committed is not None and candidate <= self.committed:
            return None
        return candidate
