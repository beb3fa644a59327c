"""The guard as the decision processor runs it: the policy in force, the approval key, the catalogue."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from streamagent.processors.decision.decider import Decision
from streamagent.processors.guard.judge import Verdict, judge

from streamagent.approval import load_approval_keys, mint
from streamagent.config import Settings
from streamagent.events import StateSnapshot, now
from streamagent.metrics import GUARD_OUTCOMES
from streamagent.policy import PolicyStore
from streamagent.signing import CommandKeys


class GuardStage:
    """Judges every decision against the policy in force (re-read when a file changes, see
    ``PolicyStore``), and mints the approval token of an approved command."""

    def __init__(
        self,
        settings: Settings,
        declared_approval: Callable[[str], bool] = lambda _tool: False,
        *,
        policies: PolicyStore | None = None,
        keys: CommandKeys | None = None,
    ) -> None:
        self.settings = settings
        # Read at start: a malformed policy file stops the processor (PolicyError names file and field).
        self.policies = policies or PolicyStore(settings.policies_dir, settings.policy_reload_s)
        self.declared_approval = declared_approval
        self._keys = keys

    @property
    def keys(self) -> CommandKeys:
        if self._keys is None:
            self._keys = load_approval_keys(self.settings)
        return self._keys

    def judge(self, snap: StateSnapshot, decision: Decision, at: datetime | None = None) -> Verdict:
        tool = decision.tool
        verdict = judge(
            snap,
            decision,
            self.policies.current(),
            environment=self.settings.environment,
            declared_approval=bool(tool) and self.declared_approval(tool or ""),
            now=at or now(),
        )
        if verdict.outcome is not None:
            GUARD_OUTCOMES.labels(verdict.outcome).inc()
        return verdict

    def token(self, snap: StateSnapshot, decision: Decision, expires_at: datetime) -> str:
        assert decision.step is not None and decision.tool is not None
        return mint(snap.run_id, decision.step, decision.tool, decision.arguments, expires_at, self.keys)
