"""Runs of the onboarding workflow folded by hand, and catalogue entries of the real tools: the LLM
decider's unit tests need snapshots at each step and the schemas the tools announce."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from streamagent.processors.state.fold import RunState, apply
from streamagent.tools import builtin_tools
from streamagent.tools.sandbox.apis import company_profile

from streamagent.catalogue import ToolEntry, schema_fingerprint
from streamagent.events import (
    DecisionAction,
    DecisionRecorded,
    Event,
    RunRequested,
    StateSnapshot,
    ToolResult,
    ToolStatus,
)

RUN = "5c1f0a4e-7d1b-4c55-8c3e-2b9f6a1d0e77"
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
DOMAIN = "acme-robotics.io"


def entries() -> dict[str, ToolEntry]:
    out = {}
    for name, tool in builtin_tools().items():
        schema = tool.input_model.model_json_schema()
        out[name] = ToolEntry(
            name=name,
            version=tool.version,
            description=tool.description,
            input_schema=schema,
            output_schema=tool.output_model.model_json_schema(),
            requires_approval=False,
            status="available",
            members=(),
            schema_fingerprint=schema_fingerprint(schema),
        )
    return out


def output_of(step: str, arguments: dict[str, Any]) -> dict[str, Any]:
    if step == "enrich":
        return company_profile(arguments["domain"])
    if step == "jira":
        return {"id": "10001", "key": arguments["key"], "url": "http://sandbox.test/jira/10001"}
    if step == "draft":  # no model configured in the tool: the workflow's template
        return {"subject": arguments["template_subject"], "body": arguments["template_body"], "drafted_by": "template"}
    if step == "email":
        return {"message_id": "msg-42", "to": arguments["to"]}
    return {"channel": arguments.get("channel", "#x"), "ts": "1714554000.000007"}


class Run:
    def __init__(self, run_id: str = RUN) -> None:
        self.clock = T0
        self.state: RunState = apply(
            None,
            RunRequested(
                event_id=f"{run_id}-requested",
                run_id=run_id,
                occurred_at=T0,
                company_name="Acme Robotics",
                company_domain=DOMAIN,
                contact_name="Ada Lovelace",
                contact_email="ada@acme-robotics.io",
                goal="onboard new B2B client",
                requested_by="crm",
            ),
            600.0,
        ).state

    @property
    def snap(self) -> StateSnapshot:
        return self.state.snapshot

    def _apply(self, event: Event) -> None:
        self.clock += timedelta(milliseconds=10)
        self.state = apply(self.state, event, 600.0).state

    def dispatch(self, step: str, arguments: dict[str, Any]) -> str:
        version = self.snap.version
        self._apply(
            DecisionRecorded(
                event_id=f"dec-{version}",
                run_id=self.snap.run_id,
                occurred_at=self.clock,
                decision_id=f"dec-{version}",
                based_on_version=version,
                action=DecisionAction.dispatch,
                step=step,
                tool=step,
                command_id=f"cmd-{step}",
                arguments=arguments,
                reason="test",
                decider="rules",
            )
        )
        return f"cmd-{step}"

    def result(self, step: str, output: dict[str, Any] | None, error: str | None = None) -> None:
        self._apply(
            ToolResult(
                event_id=f"res-{step}",
                run_id=self.snap.run_id,
                occurred_at=self.clock,
                command_id=f"cmd-{step}",
                tool=step,
                step=step,
                status=ToolStatus.succeeded if error is None else ToolStatus.failed,
                output=output or {},
                error=error,
                error_kind=None if error is None else "permanent",
            )
        )

    def done(self, step: str, arguments: dict[str, Any]) -> None:
        self.dispatch(step, arguments)
        self.result(step, output_of(step, arguments))
