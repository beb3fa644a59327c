"""What the state processor's timer looks at: only what is due, never the whole table.

``DueQueue`` keeps, per partition, a min-heap of (due time, run, kind). Scheduling again replaces
the earlier entry (the old heap item is skipped when it surfaces), so a tick costs the number of
items that are due (plus the stale ones surfacing, each once), not the number of runs the table
holds: a million finished runs cost nothing per tick. The queue is memory only and rebuilt from
the table when partitions are assigned.

``Admission`` bounds the runs in flight per partition; excess requests wait, folded and durable
in the table, and are admitted in arrival order as runs finish.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict, deque
from collections.abc import Iterable

DEADLINE = "deadline"
REDRIVE = "redrive"
APPROVAL = "approval"  # the earliest expiry of a run's pending approval requests
RETAIN = "retain"  # an ended run leaves the state table (``state_retention_s`` after its end)


class DueQueue:
    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
        self._current: dict[tuple[str, str], tuple[int, float]] = {}
        self._live: Counter[int] = Counter()  # live entries per partition
        self.touched = 0  # heap items looked at by ``due`` (tests count work, not seconds)

    def __len__(self) -> int:
        return len(self._current)

    def schedule(self, partition: int, run_id: str, kind: str, at: float) -> None:
        key = (run_id, kind)
        previous = self._current.get(key)
        if previous == (partition, at):
            return
        if previous is not None:
            self._live[previous[0]] -= 1
        self._current[key] = (partition, at)
        self._live[partition] += 1
        heap = self._heaps[partition]
        heapq.heappush(heap, (at, run_id, kind))
        if len(heap) > 64 and len(heap) > 4 * self._live[partition]:
            self._compact(partition)

    def cancel(self, run_id: str, kind: str) -> None:
        previous = self._current.pop((run_id, kind), None)
        if previous is not None:
            self._live[previous[0]] -= 1

    def scheduled(self, run_id: str, kind: str) -> float | None:
        entry = self._current.get((run_id, kind))
        return entry[1] if entry else None

    def due(self, now: float) -> list[tuple[int, str, str]]:
        """Pop every live entry due at ``now``: (partition, run, kind), earliest first per partition."""
        out: list[tuple[int, str, str]] = []
        for partition, heap in self._heaps.items():
            while heap and heap[0][0] <= now:
                at, run_id, kind = heapq.heappop(heap)
                self.touched += 1
                if self._current.get((run_id, kind)) == (partition, at):
                    del self._current[(run_id, kind)]
                    self._live[partition] -= 1
                    out.append((partition, run_id, kind))
        return out

    def next_due(self) -> float:
        """The earliest due time of any entry (stale ones included), ``inf`` when empty."""
        return min((heap[0][0] for heap in self._heaps.values() if heap), default=math.inf)

    def forget_partitions(self, keep: Iterable[int]) -> None:
        """Drop what belongs to partitions this worker no longer owns."""
        kept = set(keep)
        for partition in [p for p in self._heaps if p not in kept]:
            del self._heaps[partition]
        self._current = {k: v for k, v in self._current.items() if v[0] in kept}
        self._live = Counter(p for p, _ in self._current.values())

    def _compact(self, partition: int) -> None:
        live = [(at, run_id, kind) for (run_id, kind), (p, at) in self._current.items() if p == partition]
        heapq.heapify(live)
        self._heaps[partition] = live


class Admission:
    """At most ``per_partition`` active runs per partition; the rest wait in arrival order.

    The bound is per partition, so it holds per stack however the partitions are spread over state
    members (a partition has one owner at a time, and its count is rebuilt from the table when it
    moves): the stack runs at most ``partitions * ceil(max_running_runs / partitions)`` runs, and a
    partition that has the room admits even while another partition's runs wait.
    """

    def __init__(self, per_partition: int) -> None:
        self.per_partition = per_partition  # 0: unbounded
        self.active: dict[int, set[str]] = defaultdict(set)
        self.waiting: dict[int, deque[str]] = defaultdict(deque)

    @classmethod
    def for_stack(cls, max_running_runs: int, partitions: int) -> Admission:
        return cls(math.ceil(max_running_runs / partitions) if max_running_runs else 0)

    def has_room(self, partition: int) -> bool:
        return not self.per_partition or len(self.active[partition]) < self.per_partition

    def admit(self, partition: int, run_id: str) -> None:
        self.active[partition].add(run_id)

    def wait(self, partition: int, run_id: str) -> None:
        self.waiting[partition].append(run_id)

    def finish(self, partition: int, run_id: str) -> None:
        self.active[partition].discard(run_id)

    def next_waiting(self, partition: int) -> str | None:
        """The oldest waiting run once there is room for it (removed from the queue)."""
        queue = self.waiting[partition]
        if queue and self.has_room(partition):
            return queue.popleft()
        return None

    def withdraw(self, partition: int, run_id: str) -> None:
        """A waiting run that no longer waits (it is admitted out of turn to be ended)."""
        queue = self.waiting[partition]
        if run_id in queue:
            queue.remove(run_id)

    @property
    def running(self) -> int:
        return sum(len(v) for v in self.active.values())

    @property
    def queued(self) -> int:
        return sum(len(v) for v in self.waiting.values())

    def reset(self) -> None:
        self.active.clear()
        self.waiting.clear()
