"""One MCP client session to one server, kept open and opened again after the server went away.

A stdio server is this process's child (started again on each reconnect); a streamable-HTTP server
runs on its own. Either way the session is probed every ``mcp_probe_s`` by listing the server's
tools, and ``up`` says whether the last connect or probe answered. Whoever watches (the tool
runners, which announce their tools ``up`` or ``left`` on the registry) is told of every change.

The session is entered and left by one task (``run``), as the SDK's task groups require; calls from
the runners' tasks go through it while it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, Tool
from streamagent.tools.mcp.config import ServerConfig

from streamagent.retry import RetryPolicy

log = logging.getLogger(__name__)

RECONNECT = RetryPolicy(initial_s=0.2, max_backoff_s=2.0)


class ServerUnavailable(Exception):
    """The server is not connected right now (nothing was sent to it)."""


def _target(config: ServerConfig) -> StdioServerParameters | str:
    if config.url is not None:
        return config.url
    assert config.command is not None
    return StdioServerParameters(
        command=config.command[0],
        args=config.command[1:],
        # The SDK gives the child a few safe variables of this process's (HOME, PATH, ...) plus these.
        env=dict(config.env) or None,
        cwd=str(config.cwd) if config.cwd is not None else None,
    )


def describe(exc: BaseException) -> str:
    """One line for an error the SDK may wrap in exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:300]


class ServerConnection:
    def __init__(self, name: str, config: ServerConfig, *, probe_s: float, timeout_s: float) -> None:
        self.name = name
        self.config = config
        self.probe_s = probe_s
        self.timeout_s = timeout_s
        self.tools: dict[str, Tool] = {}  # the server's tools, by its names, from the last listing
        self.listed = asyncio.Event()  # set once the tools were listed the first time
        self.stop_event = asyncio.Event()
        self._client: Client | None = None
        self._watchers: list[Callable[[bool], None]] = []
        self.connects = 0

    @property
    def up(self) -> bool:
        return self._client is not None

    def watch(self, callback: Callable[[bool], None]) -> None:
        self._watchers.append(callback)

    def _changed(self, up: bool) -> None:
        for callback in self._watchers:
            callback(up)

    async def run(self) -> None:
        """Connect, probe, reconnect, until ``stop``."""
        failures = 0
        while not self.stop_event.is_set():
            try:
                async with Client(_target(self.config), read_timeout_seconds=self.timeout_s) as client:
                    listing = await asyncio.wait_for(client.list_tools(cache_mode="bypass"), self.timeout_s)
                    self.tools = {t.name: t for t in listing.tools}
                    self._client = client
                    self.connects += 1
                    failures = 0
                    self.listed.set()
                    log.info("MCP server %s connected (%s)", self.name, self.config.transport)
                    self._changed(True)
                    await self._probe(client)
            except asyncio.CancelledError:
                if self.stop_event.is_set():
                    break
                raise
            except BaseException as exc:  # the SDK raises exception groups from its task groups
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("MCP server %s unavailable: %s", self.name, describe(exc))
            finally:
                if self._client is not None:
                    self._client = None
                    self._changed(False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), RECONNECT.backoff(max(failures, 1)))

    async def _probe(self, client: Client) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), self.probe_s)
            if self.stop_event.is_set():
                return
            await asyncio.wait_for(client.list_tools(cache_mode="bypass"), self.timeout_s)

    def stop(self) -> None:
        self.stop_event.set()

    async def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> CallToolResult:
        """Call tool ``name``; ``ServerUnavailable`` if not connected (then nothing was sent)."""
        client = self._client
        if client is None:
            raise ServerUnavailable(f"MCP server {self.name} is not connected")
        return await asyncio.wait_for(client.call_tool(name, arguments, read_timeout_seconds=timeout_s), timeout_s)
