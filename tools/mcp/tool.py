"""An MCP server's tool as a ``Tool``: the SDK's runner consumes, verifies, admits, dedupes and
answers its commands as for any tool; ``call`` goes through the MCP client session.

The tool describes itself with what the server lists (its name, description and input JSON Schema;
the output schema if the server gives one) and what the servers file adds (approval, timeout,
retry, idempotency key). One class per exposed tool is made at start (``tool_class``), since the
runner reads a tool's description from its class.

Exactly once, for an MCP tool (docs/guides/mcp.md):

- the idempotency ledger, as for every tool: a command with a recorded result is never called
  again, its result is republished;
- no ``idempotency_key`` (the default: MCP says nothing of idempotency): **at most once**. The call's
  start is committed (``calls.CallLog``) before it is sent; a command whose start is recorded but whose
  result is not (the process was killed mid-call, the connection broke, the call timed out) fails
  with ``unknown-outcome`` and is never sent again. Nothing retries it: a person or the workflow's
  ``on_failure`` decides.
- ``idempotency_key = "ARG"``: the argument ``ARG`` is set to the command id on every attempt, and
  a failed or interrupted call is retried like any tool's; the server's dedupe on ``ARG`` makes the
  repeat a replay.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import jsonschema
from mcp.types import CallToolResult, TextContent
from mcp.types import Tool as McpListing
from pydantic import BaseModel, ConfigDict
from streamagent.tools.mcp.calls import CallLog
from streamagent.tools.mcp.config import ExposedTool
from streamagent.tools.mcp.connection import ServerConnection, ServerUnavailable, describe
from streamagent.tools.sdk.errors import PermanentError, RetryableError, UnknownOutcome
from streamagent.tools.sdk.tool import CallContext, Tool

from streamagent.catalogue import Announcement
from streamagent.retry import RetryPolicy

# An MCP tool with no idempotency key is never retried by the SDK: a second attempt could repeat an
# effect (one attempt; a retryable failure before anything was sent is waited out as an outage).
AT_MOST_ONCE = RetryPolicy(max_attempts=1)
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class McpArguments(BaseModel):
    """The command's arguments, checked against the server's JSON Schema (not a pydantic model)."""

    arguments: dict[str, Any]


class McpOutput(BaseModel):
    """What the server answered: its structured content, or its text content under ``content``."""

    model_config = ConfigDict(extra="allow")


class McpTool(Tool[McpArguments, McpOutput]):
    server: ClassVar[str]
    mcp_name: ClassVar[str]
    listed_input_schema: ClassVar[dict[str, Any]]
    listed_output_schema: ClassVar[dict[str, Any]]
    exposed: ClassVar[ExposedTool]
    connection: ClassVar[ServerConnection]
    calls: ClassVar[CallLog]
    input_model = McpArguments
    output_model = McpOutput

    @classmethod
    def declaration(cls, **member: Any) -> Announcement:
        return Announcement(
            name=cls.name,
            description=cls.description,
            input_schema=cls.listed_input_schema,
            output_schema=cls.listed_output_schema,
            requires_approval=cls.requires_approval,
            version=cls.version,
            timeout_s=cls.timeout_s,
            retry=asdict(cls.retry),
            **member,
        )

    def parse(self, arguments: dict[str, Any]) -> BaseModel:
        try:
            jsonschema.validate(arguments, self.listed_input_schema)
        except jsonschema.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path) or "arguments"
            raise PermanentError(f"invalid arguments for {self.name}: {where}: {exc.message}") from exc
        except jsonschema.SchemaError as exc:
            raise PermanentError(f"MCP server {self.server} lists an invalid schema for {self.mcp_name}") from exc
        return McpArguments(arguments=arguments)

    async def call(self, args: McpArguments, ctx: CallContext) -> McpOutput:
        arguments = dict(args.arguments)
        key = self.exposed.idempotency_key
        timeout = self.call_timeout(ctx.http.timeout.read or 5.0)
        if not self.connection.up:
            raise RetryableError(f"MCP server {self.server} is not connected")
        if key is not None:
            arguments[key] = ctx.command_id
        else:
            earlier = await self.calls.start(ctx.command_id, self.name, self.server, ctx.run_id)
            if earlier is not None:
                raise UnknownOutcome(
                    f"{self.name} was called for this command at {earlier.isoformat()} and its outcome was never"
                    f" recorded (the tool process stopped or lost MCP server {self.server} mid-call); it is not"
                    " called again: check the server, then retry the step or fix it by hand"
                )
        try:
            result = await self.connection.call(self.mcp_name, arguments, timeout)
        except ServerUnavailable as exc:  # nothing was sent
            if key is None:
                await self.calls.forget(ctx.command_id)
            raise RetryableError(str(exc)) from exc
        except (TimeoutError, Exception) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed mid-call ({describe(exc)})"
            if key is not None:
                raise RetryableError(f"MCP call {self.mcp_name} {what}") from exc
            raise UnknownOutcome(
                f"MCP call {self.mcp_name} on server {self.server} {what}: it may or may not have taken effect,"
                " and it is not repeated"
            ) from exc
        return self._output(result)

    def _output(self, result: CallToolResult) -> McpOutput:
        texts = [block.text for block in result.content if isinstance(block, TextContent)]
        if result.is_error:
            raise PermanentError(f"MCP tool {self.mcp_name} answered an error: {' '.join(texts)[:500]}")
        if isinstance(result.structured_content, dict):
            return McpOutput.model_validate(result.structured_content)
        return McpOutput.model_validate({"content": "\n".join(texts)})


def tool_class(
    server: str,
    mcp_name: str,
    listing: McpListing,
    exposed: ExposedTool,
    connection: ServerConnection,
    calls: CallLog,
) -> type[McpTool]:
    """The ``Tool`` class of one exposed MCP tool, described by the server's listing and the config."""
    name = exposed.alias or mcp_name
    attributes = {
        "name": name,
        "description": exposed.description or listing.description or f"{mcp_name} (MCP server {server})",
        "requires_approval": exposed.requires_approval,
        "version": exposed.version,
        "timeout_s": exposed.timeout_s,
        "retry": exposed.retry.policy() if exposed.retry else (RetryPolicy() if exposed.idempotent else AT_MOST_ONCE),
        "server": server,
        "mcp_name": mcp_name,
        "listed_input_schema": dict(listing.input_schema or ANY_OBJECT),
        "listed_output_schema": dict(listing.output_schema or ANY_OBJECT),
        "exposed": exposed,
        "connection": connection,
        "calls": calls,
        "__module__": __name__,
    }
    return type(f"Mcp_{name}", (McpTool,), attributes)
