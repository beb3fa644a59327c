"""``streamagent tool mcp --server NAME``: one process per MCP server, one consumer group per tool.

Why one process per server and not one per tool: a stdio server is a child of the process that
talks to it, and most MCP servers keep state per session; one session shared by the server's tools
means one child process (one set of credentials, one warm cache) instead of one per tool. Each
exposed tool still is its own ``ToolRunner``, so its own command topic, consumer group, ledger rows,
registry member, rate limit and metrics, exactly as a tool written in Python. ``--tool NAME`` runs a
subset (e.g. one tool per process, to scale one tool alone or to give each its own role key file).

Availability follows the server: each runner announces its tool ``up`` while the session answers
and ``left`` as soon as a probe or a connect fails, so the catalogue shows the tool ``unavailable``
and the decision layer parks runs that need it, as for any tool that is not deployed. A command that
arrives meanwhile waits as an outage (never called, never dead-lettered) until the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from streamagent.tools.mcp.calls import SCHEMA as CALLS_SCHEMA
from streamagent.tools.mcp.calls import CallLog
from streamagent.tools.mcp.config import McpConfigError, ServerConfig
from streamagent.tools.mcp.connection import ServerConnection
from streamagent.tools.mcp.tool import McpTool, tool_class
from streamagent.tools.sdk.runner import ToolRunner, ensure_command_topic

from streamagent import db
from streamagent.approval import load_approval_keys
from streamagent.authn import role_keys, tool_role
from streamagent.config import Settings
from streamagent.errors import DependencyUnavailable
from streamagent.events import ToolCommand
from streamagent.policy import PolicyStore

log = logging.getLogger(__name__)


class McpToolRunner(ToolRunner):
    """A ``ToolRunner`` whose registry presence and calls follow its MCP server's connection."""

    def __init__(self, settings: Settings, tool: McpTool, connection: ServerConnection, **kwargs: Any) -> None:
        super().__init__(settings, tool, **kwargs)
        self.connection = connection
        self._changed = asyncio.Event()
        connection.watch(lambda _up: self._changed.set())

    async def _heartbeat(self) -> None:
        """``up`` every heartbeat while the server answers; ``left`` once when it stops answering."""
        said = "up"  # ``run`` announced it at start
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=self.settings.registry_heartbeat_s)
            self._changed.clear()
            if self.stop_event.is_set():
                return
            state = "up" if self.connection.up else "left"
            if state == "left" and said == "left":
                continue
            try:
                await self._announce(state)
                if state != said:
                    log.warning(
                        "tool %s announced %s: MCP server %s %s",
                        self.tool.name,
                        state,
                        self.connection.name,
                        "is back" if state == "up" else "does not answer",
                        extra={"tool": self.tool.name},
                    )
                said = state
            except Exception as exc:  # an outage of Kafka: the next change or heartbeat tries again
                log.warning("announcement not delivered: %r", exc, extra={"tool": self.tool.name})

    async def _attempts(self, command: ToolCommand, recorded: int) -> Any:
        # With the server gone, the command waits as an outage (_execute_through_outages): nothing is
        # sent, nothing is recorded as started, the deadline is not spent on retries.
        if not self.connection.up:
            raise DependencyUnavailable(f"mcp:{self.connection.name}", "the MCP server does not answer")
        return await super()._attempts(command, recorded)


def select(config: ServerConfig, only: Sequence[str]) -> dict[str, str]:
    """The exposed tools to run, as {MCP name: catalogue name}; ``only`` names either."""
    exposed = {mcp_name: config.catalogue_name(mcp_name) for mcp_name in config.tools}
    if not only:
        return exposed
    unknown = [n for n in only if n not in exposed and n not in exposed.values()]
    if unknown:
        raise McpConfigError(
            f"the server exposes no tool {', '.join(unknown)} (it exposes: {', '.join(sorted(exposed.values()))})"
        )
    return {m: c for m, c in exposed.items() if m in only or c in only}


async def serve(settings: Settings, name: str, config: ServerConfig, only: Sequence[str] = ()) -> None:
    chosen = select(config, only)
    timeout = max([settings.tool_timeout_s, *(t.timeout_s or 0 for t in config.tools.values())])
    connection = ServerConnection(name, config, probe_s=settings.mcp_probe_s, timeout_s=timeout)
    keeper = asyncio.create_task(connection.run())
    loop = asyncio.get_running_loop()
    runners: list[McpToolRunner] = []
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        for runner in runners:
            runner.stop()
        connection.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    # The tools are described by the server's listing: wait for the first (a server down at start is
    # waited for, as a database is).
    listed = asyncio.create_task(connection.listed.wait())
    await asyncio.wait([listed, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
    if stopping.is_set():
        keeper.cancel()
        return
    missing = [m for m in chosen if m not in connection.tools]
    if missing:
        stop()
        await keeper
        raise McpConfigError(
            f"MCP server {name} lists no tool {', '.join(missing)} (it lists: {', '.join(sorted(connection.tools))})"
        )
    calls = CallLog(settings.database_url)
    approval_keys = load_approval_keys(settings)
    policies = PolicyStore(settings.policies_dir, settings.policy_reload_s)
    for mcp_name in chosen:
        cls = tool_class(name, mcp_name, connection.tools[mcp_name], config.tools[mcp_name], connection, calls)
        keys = role_keys(settings, tool_role(cls.name)).keys
        runners.append(
            McpToolRunner(settings, cls(), connection, keys=keys, approval_keys=approval_keys, policies=policies)
        )
    log.info("serving MCP server %s: %s", name, ", ".join(r.tool.name for r in runners))
    try:
        await asyncio.gather(*(runner.run() for runner in runners))
    finally:
        connection.stop()
        await keeper
        await calls.close()


def run_mcp_server(settings: Settings, name: str, config: ServerConfig, only: Sequence[str] = ()) -> None:
    # A bad key, approval key or policy refuses the start (one line from the CLI), before Kafka is touched.
    for catalogue_name in select(config, only).values():
        role_keys(settings, tool_role(catalogue_name))
        ensure_command_topic(settings, catalogue_name)
    load_approval_keys(settings)
    PolicyStore(settings.policies_dir, settings.policy_reload_s)
    db.migrate(settings, CALLS_SCHEMA, wait_s=db.WAIT_FOREVER)
    asyncio.run(serve(settings, name, config, only))
