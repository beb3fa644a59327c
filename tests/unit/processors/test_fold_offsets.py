"""The state fold's own offsets: records taken in order, holes found, redeliveries dropped, commits only settled."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from streamagent.processors.state.offsets import FoldOffsets, Skipped

EV, RES = "agent.run.events", "agent.tool.results"


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int


def msgs(topic: str, partition: int, *offsets: int) -> list[Msg]:
    return [Msg(topic, partition, o) for o in offsets]


def committed(table: dict[tuple[str, int], int]):
    return lambda tp: table.get(tp)


def test_a_partition_resumes_where_the_group_committed_and_a_skip_there_is_a_hole() -> None:
    offsets = FoldOffsets({})
    # faust delivered 140 first: 138 and 139 (committed at 138) never came.
    batch = msgs(EV, 2, 91, 92) + msgs(RES, 2, 140, 141)
    assert offsets.holes(batch, committed({(RES, 2): 138, (EV, 2): 91})) == {(RES, 2): (138, 140)}
    with pytest.raises(Skipped, match=r"offsets 138\.\.139 were never delivered"):
        offsets.take(batch, committed({(RES, 2): 138, (EV, 2): 91}))
    assert offsets.folded == {}  # all or nothing: the batch's other records were not taken either


def test_the_filled_records_then_the_delivered_ones_are_taken_in_order() -> None:
    offsets = FoldOffsets({})
    start = committed({(RES, 2): 138})
    taken = offsets.take(msgs(RES, 2, 138, 139, 140, 141), start)
    assert [m.offset for m in taken] == [138, 139, 140, 141]
    assert offsets.folded == {(RES, 2): 142}


def test_a_redelivery_below_what_was_folded_is_dropped() -> None:
    offsets = FoldOffsets({(EV, 0): 10})
    taken = offsets.take(msgs(EV, 0, 8, 9, 10, 11), committed({}))
    assert [m.offset for m in taken] == [10, 11]
    assert offsets.holes(msgs(EV, 0, 5, 12), committed({})) == {}


def test_a_hole_inside_a_batch_after_delivered_records_is_found() -> None:
    offsets = FoldOffsets({(EV, 0): 10})
    assert offsets.holes(msgs(EV, 0, 10, 11, 15, 16), committed({})) == {(EV, 0): (12, 15)}


def test_a_partition_never_committed_starts_with_its_first_record() -> None:
    offsets = FoldOffsets({})
    assert offsets.holes(msgs(EV, 1, 7, 8), committed({})) == {}
    assert [m.offset for m in offsets.take(msgs(EV, 1, 7, 8), committed({}))] == [7, 8]


def test_only_settled_offsets_are_committed_and_never_backwards() -> None:
    offsets = FoldOffsets({})
    offsets.take(msgs(EV, 0, 0, 1, 2), committed({}))
    assert offsets.commit_offset((EV, 0)) is None  # folded, not yet acknowledged
    offsets.settle(dict(offsets.folded))
    assert offsets.commit_offset((EV, 0)) == 3
    offsets.forget()  # revoked; a redelivery after the seek starts lower
    offsets.take(msgs(EV, 0, 1), committed({}))
    offsets.settle(dict(offsets.folded))
    assert offsets.commit_offset((EV, 0)) == 3


def test_a_quiet_partition_whose_end_lies_beyond_the_fold_is_stalled() -> None:
    offsets = FoldOffsets({})
    offsets.take(msgs(EV, 0, 0, 1), committed({}))
    offsets.take(msgs(EV, 1, 0), committed({}))
    ends = {(EV, 0): 5, (EV, 1): 1}
    assert offsets.stalled(ends, quiet_s=3600) == {}  # just delivered: faust is on it
    assert offsets.stalled(ends, quiet_s=0) == {(EV, 0): (2, 5)}  # (EV, 1) is at its end
