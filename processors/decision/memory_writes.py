"""What a run tells shared memory: a step that succeeded writes the entities its workflow says it writes.

``writes.company.key = "{request.company_domain}"`` with ``writes.company.set.account_id =
"{steps.accounts.output.id}"`` makes the account id the first run created visible to every later run for
that company. The decision processor, which sees every snapshot, sends the write once it sees the step
succeeded: to ``agent.memory.writes``, keyed by the entity, signed as the decision processor, to the
memory processor that is the entity's one writer.

Two runs must not overwrite each other silently. When the step also *reads* the entity, the write names
the version its decision read (``expected_version``): if another run wrote the entity in between, the
memory processor refuses the write as ``version-conflict`` (dead-lettered with both versions named) and
memory keeps the other run's value, which the next decision that reads it sees. A step that does not
read the entity writes last-writer-wins, on purpose (the workflow said it does not care what was there).

Exactly once: the write's id is made from the run, the step and the entity, so however often it is sent
(every snapshot after the step succeeded, until this process remembers it did; again after a restart)
the memory processor applies it once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from streamagent.processors.workflow import Workflows

from streamagent import codec
from streamagent.authn import RoleKeys
from streamagent.events import DecisionAction, DecisionRecorded, MemoryWrite, StateSnapshot, StepStatus, stable_id

log = logging.getLogger(__name__)

# Steps whose writes this process sent, remembered so that later snapshots of the run send nothing.
_REMEMBERED = 100_000


def write_id(run_id: str, step: str, entity: str) -> str:
    return stable_id(run_id, step, entity, "memory-write")


class MemoryWriter:
    def __init__(self, workflows: Workflows, producer: Any, signer: RoleKeys, topic: str) -> None:
        self.workflows = workflows
        self.producer = producer
        self.signer = signer
        self.topic = topic
        self._sent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.sent = 0

    def after(self, conn: Any, snapshots: list[StateSnapshot]) -> int:
        """Send the writes of steps these snapshots show succeeded and that were not sent yet; how many."""
        sent = 0
        for snap in snapshots:
            workflow = self.workflows.get(snap.request.workflow)
            if workflow is None:
                continue
            results = snap.results()
            for state in snap.steps:
                if state.status is not StepStatus.succeeded or (snap.run_id, state.name) in self._sent:
                    continue
                step = workflow.step(state.name)
                if not step.writes:
                    continue
                read = _read_by(conn, snap.run_id, step.name) if step.reads else {}
                for write in step.writes:
                    sent += self._send(snap, step.name, write, results, read, {r.entity for r in step.reads})
                self._sent[(snap.run_id, state.name)] = None
                while len(self._sent) > _REMEMBERED:
                    self._sent.popitem(last=False)
        self.sent += sent
        return sent

    def _send(
        self,
        snap: StateSnapshot,
        step: str,
        write: Any,
        results: dict[str, dict[str, Any]],
        read: dict[str, int],
        reads: set[str],
    ) -> int:
        try:
            ref = write.ref(snap.request, results, snap.run_id)
            fields = write.fields.build(snap.request, results, snap.run_id)
        except KeyError as exc:  # an output the workflow names is missing: nothing to write, said once
            log.warning("memory write of step %s not sent: %s", step, exc, extra={"run_id": snap.run_id})
            return 0
        key = ref.split("/", 1)[1]
        change = MemoryWrite(
            write_id=write_id(snap.run_id, step, write.entity),
            entity=write.entity,
            key=key,
            set=fields,
            # Based on what the step's decision read, when it read the entity: a run that did not see
            # another's write does not overwrite it.
            expected_version=read.get(ref, 0) if write.entity in reads else None,
            writer=f"run:{snap.run_id}/{step}",
            causation_id=snap.last_event_id,
        )
        value = codec.encode(change)
        self.producer.produce(self.topic, key=ref.encode(), value=value, headers=self.signer.headers(value))
        log.info("memory write sent for %s", ref, extra={"run_id": snap.run_id, "step": step})
        return 1


def _read_by(conn: Any, run_id: str, step: str) -> dict[str, int]:
    """The memory versions the step's last dispatch decision read (empty: none recorded)."""
    row = conn.execute(
        "SELECT decision_event FROM decisions WHERE run_id = %s AND step = %s AND action = %s"
        " ORDER BY based_on_version DESC LIMIT 1",
        (run_id, step, DecisionAction.dispatch.value),
    ).fetchone()
    if row is None:
        return {}
    decision = codec.decode(bytes(row[0]))
    return dict(decision.memory) if isinstance(decision, DecisionRecorded) else {}
