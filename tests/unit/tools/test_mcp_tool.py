"""An MCP tool as a ``Tool``: the servers file, the schema it announces, and at-most-once calls.

The MCP server is real (tests/mcp_server.py over stdio, a child process); the record of started
calls is an in-memory stand-in for the PostgreSQL table (``calls.CallLog``), which the integration
test (tests/integration/test_mcp_tools.py) exercises for real.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import TEST_APPROVAL_KEYS, TEST_COMMAND_KEYS
from mcp_server import calls
from streamagent.tools.mcp import config as mcp_config
from streamagent.tools.mcp.connection import ServerConnection
from streamagent.tools.mcp.runner import select
from streamagent.tools.mcp.tool import McpTool, tool_class
from streamagent.tools.sdk import CallContext, PermanentError, RetryableError
from streamagent.tools.sdk.errors import UnknownOutcome

SERVER = Path(__file__).resolve().parents[2] / "mcp_server.py"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mcp.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_servers_file_is_read_with_its_tools_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[servers.desk]
command = ["python", "server.py"]
env = { TOKEN = "x" }
[servers.desk.tools.create_ticket]
requires_approval = true
timeout_s = 10
idempotency_key = "request_id"
retry = { max_attempts = 4 }
[servers.desk.tools.lookup_customer]
as = "desk_lookup"

[servers.remote]
url = "http://127.0.0.1:9/mcp"
[servers.remote.tools.search]
""",
    )
    found = mcp_config.load(path)
    desk = found.servers["desk"]
    assert desk.transport == "stdio" and found.servers["remote"].transport == "http"
    ticket = desk.tools["create_ticket"]
    assert ticket.requires_approval and ticket.idempotent and ticket.retry and ticket.retry.policy().max_attempts == 4
    assert desk.catalogue_name("lookup_customer") == "desk_lookup"
    assert select(desk, ["desk_lookup"]) == {"lookup_customer": "desk_lookup"}
    with pytest.raises(mcp_config.McpConfigError, match="exposes no tool nope"):
        select(desk, ["nope"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[servers.a]\ncommand = ["x"]\nurl = "http://h/mcp"\n[servers.a.tools.t]\n', "exactly one of command"),
        ("[servers.a]\n[servers.a.tools.t]\n", "exactly one of command"),
        ('[servers.a]\ncommand = ["x"]\n', "servers.a.tools"),
        ('[servers.a]\ncommand = ["x"]\n[servers.a.tools.Bad]\n', "cannot be a tool name"),
        ('[servers.a]\ncommand = ["x"]\n[servers.a.tools.t]\ntimeout = 3\n', "servers.a.tools.t.timeout"),
        ("[servers.a\n", "not valid TOML"),
    ],
)
def test_a_bad_servers_file_is_refused_naming_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(mcp_config.McpConfigError, match=message):
        mcp_config.load(write(tmp_path, text))


def test_a_missing_file_or_server_is_named(tmp_path: Path) -> None:
    with pytest.raises(mcp_config.McpConfigError, match="no MCP servers file at"):
        mcp_config.load(tmp_path / "absent.toml")
    path = write(tmp_path, '[servers.a]\ncommand = ["x"]\n[servers.a.tools.t]\n')
    with pytest.raises(mcp_config.McpConfigError, match=r"no MCP server 'b' .*configures: a"):
        mcp_config.server(path, "b")


class MemoryCallLog:
    """``CallLog`` without PostgreSQL: the same answers."""

    def __init__(self) -> None:
        self.started: dict[str, datetime] = {}

    async def start(self, command_id: str, tool: str, server: str, run_id: str) -> datetime | None:
        if command_id in self.started:
            return self.started[command_id]
        self.started[command_id] = datetime.now(UTC)
        return None

    async def forget(self, command_id: str) -> None:
        self.started.pop(command_id, None)


async def with_tool(tmp_path: Path, options: str, body: Any) -> Any:
    record = tmp_path / "calls.jsonl"
    path = write(
        tmp_path,
        f"""
[servers.desk]
command = ["{sys.executable}", "{SERVER}", "--record", "{record}"]
[servers.desk.tools.create_ticket]
{options}
""",
    )
    server = mcp_config.server(path, "desk")
    connection = ServerConnection("desk", server, probe_s=5, timeout_s=30)
    keeper = asyncio.create_task(connection.run())
    try:
        await asyncio.wait_for(connection.listed.wait(), 30)
        log = MemoryCallLog()
        cls = tool_class(
            "desk", "create_ticket", connection.tools["create_ticket"], server.tools["create_ticket"], connection, log
        )  # type: ignore[arg-type]
        async with httpx.AsyncClient(timeout=10) as http:
            return await body(cls(), http, log, record, connection)
    finally:
        connection.stop()
        await asyncio.wait_for(keeper, 30)


def ctx(http: httpx.AsyncClient, command_id: str = "cmd-1", attempt: int = 1) -> CallContext:
    return CallContext(http, "run-1", command_id, attempt)


def test_the_tool_announces_the_servers_schema_and_is_called_at_most_once(tmp_path: Path) -> None:
    async def body(tool: McpTool, http: httpx.AsyncClient, log: MemoryCallLog, record: Path, _c: Any) -> None:
        announced = tool.declaration(member_id="m", state="up")
        assert announced.name == "create_ticket" and announced.input_schema["required"] == ["subject", "customer"]
        assert announced.retry is not None and announced.retry["max_attempts"] == 1
        assert announced.requires_approval is False and announced.timeout_s is None
        args = tool.parse({"subject": "Onboard Acme", "customer": "acme.io"})
        out = await tool.call(args, ctx(http))  # type: ignore[arg-type]
        assert out.model_dump()["customer"] == "acme.io" and out.model_dump()["ticket_id"].startswith("T-")
        # The same command again (a redelivery after a crash that lost the result): reported, not sent.
        with pytest.raises(UnknownOutcome, match="outcome was never recorded"):
            await tool.call(args, ctx(http, attempt=2))  # type: ignore[arg-type]
        assert len(calls(record, "create_ticket")) == 1
        with pytest.raises(PermanentError, match="invalid arguments for create_ticket: arguments: 'customer'"):
            tool.parse({"subject": "x"})
        with pytest.raises(PermanentError, match="subject: 3 is not of type 'string'"):
            tool.parse({"subject": 3, "customer": "acme.io"})

    asyncio.run(with_tool(tmp_path, "", body))


def test_with_an_idempotency_key_the_command_id_is_the_key_and_repeats_are_allowed(tmp_path: Path) -> None:
    async def body(tool: McpTool, http: httpx.AsyncClient, log: MemoryCallLog, record: Path, _c: Any) -> None:
        assert tool.retry.max_attempts == 0  # retried until the deadline, like any tool
        announced = tool.declaration(member_id="m", state="up")
        assert announced.requires_approval is True and announced.timeout_s == 7 and announced.version == "3"
        args = tool.parse({"subject": "Onboard Acme", "customer": "acme.io", "request_id": "from-the-model"})
        await tool.call(args, ctx(http, "cmd-7"))  # type: ignore[arg-type]
        await tool.call(args, ctx(http, "cmd-7", attempt=2))  # type: ignore[arg-type]
        sent = calls(record, "create_ticket")
        assert [c["arguments"]["request_id"] for c in sent] == ["cmd-7", "cmd-7"]  # type: ignore[index]
        assert log.started == {}  # nothing to record: the server dedupes on the key

    options = 'idempotency_key = "request_id"\nrequires_approval = true\ntimeout_s = 7\nversion = "3"'
    asyncio.run(with_tool(tmp_path, options, body))


def test_a_server_that_is_not_connected_is_retryable_and_records_no_start(tmp_path: Path) -> None:
    async def body(tool: McpTool, http: httpx.AsyncClient, log: MemoryCallLog, record: Path, conn: Any) -> None:
        conn._client = None  # as after a failed probe
        args = tool.parse({"subject": "x", "customer": "acme.io"})
        with pytest.raises(RetryableError, match="not connected"):
            await tool.call(args, ctx(http))  # type: ignore[arg-type]
        assert log.started == {} and calls(record, "create_ticket") == []

    asyncio.run(with_tool(tmp_path, "", body))


CLI_MISTAKES = [
    (["tool", "mcp"], "", "tool mcp needs --server NAME"),
    (["tool", "mcp", "--server", "nope"], "", "no MCP servers file at"),
    (["tool", "mcp", "--server", "b"], '[servers.a]\ncommand = ["x"]\n[servers.a.tools.t]\n', "no MCP server 'b'"),
    (
        ["tool", "mcp", "--server", "a", "--tool", "u"],
        '[servers.a]\ncommand = ["x"]\n[servers.a.tools.t]\n',
        "no tool u",
    ),
    (["tool", "crm", "--server", "a"], "", "options of `streamagent tool mcp`"),
]


@pytest.mark.parametrize(("argv", "servers", "needle"), CLI_MISTAKES, ids=[" ".join(a) for a, _s, _n in CLI_MISTAKES])
def test_a_users_mistake_is_one_line_and_exit_2(
    argv: list[str], servers: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from streamagent.config import get_settings
    from streamagent.console import cli

    for key in list(os.environ):
        if key.startswith("STREAMAGENT_"):
            monkeypatch.delenv(key)
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "BOOTSTRAP_SERVERS": "127.0.0.1:1",  # never reached: each mistake is refused before
        "DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
        "SANDBOX_URL": "http://127.0.0.1:1",
        "COMMAND_KEYS": TEST_COMMAND_KEYS,
        "APPROVAL_KEYS": TEST_APPROVAL_KEYS,
    }
    if servers:
        env["MCP_CONFIG"] = str(write(tmp_path, servers))
    for name, value in env.items():
        monkeypatch.setenv(f"STREAMAGENT_{name}", value)
    get_settings.cache_clear()
    try:
        code = cli.main(argv)
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
