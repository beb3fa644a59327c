"""The MCP servers file (``STREAMAGENT_MCP_CONFIG``, default ``<workflows dir>/mcp.toml``), validated.

```toml
[servers.helpdesk]
command = ["python", "helpdesk_server.py"]      # stdio: the server is this tool process's child
# url = "http://127.0.0.1:8765/mcp"             # or streamable HTTP: a server running on its own
env = { HELPDESK_TOKEN = "..." }                # stdio only: added to the child's environment

[servers.helpdesk.tools.create_ticket]          # only the tools listed here are exposed
requires_approval = true
timeout_s = 10
idempotency_key = "request_id"                  # the argument the server dedupes on: retries allowed
retry = { max_attempts = 5, initial_s = 0.2 }

[servers.helpdesk.tools.lookup_customer]
as = "helpdesk_lookup"                          # the catalogue name, if the server's is taken or not lower case
```

Every mistake is refused at start with a message naming the file, the server and the field.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamagent.retry import RetryPolicy

TOOL_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class McpConfigError(ValueError):
    """The MCP servers file is missing, not TOML, or says something invalid."""


class RetrySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(0, ge=0)
    initial_s: float = Field(0.05, gt=0)
    multiplier: float = Field(2.0, ge=1)
    max_backoff_s: float = Field(2.0, gt=0)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            initial_s=self.initial_s,
            multiplier=self.multiplier,
            max_backoff_s=self.max_backoff_s,
            max_attempts=self.max_attempts,
        )


class ExposedTool(BaseModel):
    """One MCP tool deployed as a streamagent tool: what the server does not say about it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    alias: str | None = Field(None, alias="as", description="catalogue name; default: the server's tool name")
    requires_approval: bool = False
    timeout_s: float | None = Field(None, gt=0)
    # The argument the server deduplicates on. Named: the SDK fills it with the command id and may
    # retry; unnamed: the call is made at most once and a crash mid-call is reported, not retried.
    idempotency_key: str | None = Field(None, min_length=1)
    retry: RetrySpec | None = None
    version: str = "1"
    description: str | None = None  # replaces the server's, e.g. to say more to the model

    @property
    def idempotent(self) -> bool:
        return self.idempotency_key is not None


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: list[str] | None = Field(None, min_length=1)
    url: str | None = Field(None, pattern=r"^https?://")
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    tools: dict[str, ExposedTool] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_transport(self) -> ServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of command (stdio) or url (streamable HTTP)")
        if self.url is not None and (self.env or self.cwd):
            raise ValueError("env and cwd apply to a stdio server (command) only")
        return self

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"

    def catalogue_name(self, mcp_name: str) -> str:
        return self.tools[mcp_name].alias or mcp_name


class McpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    servers: dict[str, ServerConfig] = Field(default_factory=dict)


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load(path: Path) -> McpConfig:
    """The file at ``path``, validated; ``McpConfigError`` names what is wrong and where."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise McpConfigError(
            f"no MCP servers file at {path} (set STREAMAGENT_MCP_CONFIG, or write one: docs/guides/mcp.md)"
        ) from None
    except OSError as exc:
        raise McpConfigError(f"cannot read the MCP servers file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise McpConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        config = McpConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise McpConfigError(f"{path}: {problems}") from None
    for server_name, server in config.servers.items():
        names: dict[str, str] = {}
        for mcp_name in server.tools:
            name = server.catalogue_name(mcp_name)
            if not TOOL_NAME.match(name):
                raise McpConfigError(
                    f"{path}: servers.{server_name}.tools.{mcp_name}: {name!r} cannot be a tool name (lower case"
                    ' letters, digits, _ and -, starting with a letter); give it one with `as = "..."`'
                )
            if name in names:
                raise McpConfigError(
                    f"{path}: servers.{server_name}: tools {names[name]} and {mcp_name} are both {name}"
                )
            names[name] = mcp_name
    return config


def server(path: Path, name: str) -> ServerConfig:
    config = load(path)
    found = config.servers.get(name)
    if found is None:
        known = ", ".join(sorted(config.servers)) or "none"
        raise McpConfigError(f"{path} configures no MCP server {name!r} (it configures: {known})")
    return found
