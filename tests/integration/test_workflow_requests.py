"""A request from another producer naming an unknown workflow is dead-lettered by the state processor."""

from __future__ import annotations

import pytest
from helpers import ended, eventually
from streamagent.processors.projection import queries

from streamagent import codec
from streamagent.config import Settings
from streamagent.console.demo import sample_requests
from streamagent.console.devstack.stack import Stack
from streamagent.dlq import DeadLetter
from streamagent.dlq_ops import read_dead_letters
from streamagent.submit import produce_requests
from streamagent.topics import RUN_REQUESTS

pytestmark = pytest.mark.integration


def test_a_request_for_an_unknown_workflow_is_dead_lettered_and_the_stack_goes_on(settings: Settings) -> None:
    stray, good = sample_requests(2)
    stray = stray.model_copy(update={"workflow": "no-such-flow"})
    with Stack(settings) as stack:
        s = stack.settings
        # Produced as another system would: no `submit` check in front of it.
        produce_requests(s, [stray, good])

        def letters() -> list[DeadLetter]:
            return [d for d in read_dead_letters(s, reason="unknown_workflow") if d.processor == "intake"]

        (letter,) = eventually(letters, timeout=60, interval=0.5, what="the stray request dead-lettered")
        # Refused at intake: it never reaches the run log, so no run row exists for it.
        assert letter.source_topic == s.topic(RUN_REQUESTS)
        assert "workflow" in letter.error
        assert letter.value == codec.encode(stray)  # the original bytes, kept for a replay after the fix
        assert "no-such-flow" in letter.error
        (row,) = eventually(lambda: ended(s, [good.run_id]), timeout=60, what="the good run ended")
        assert row.status == "completed"
        assert {n: c.restarts for n, c in stack.children.items() if c.restarts} == {}
        assert queries.run(s, stray.run_id) is None
