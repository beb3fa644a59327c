"""A small, real MCP server for the tests (and the "use an MCP server" docs page): a help desk.

Two tools, each with an input schema the SDK derives from its signature: ``create_ticket`` (an
effect: a ticket is created) and ``lookup_customer`` (a read). Every call is recorded as one JSON
line in the file named by ``--record`` (``started`` when the call arrives, ``finished`` when it
answers), so a test counts effects the way the SaaS sandbox lets it count API calls.

Run over stdio (``python tests/mcp_server.py --transport stdio --record calls.jsonl``) or over
streamable HTTP (``--transport http --port N``, served at ``http://127.0.0.1:N/mcp``).

Test hooks: ``--delay-file PATH``: while that file exists, ``create_ticket`` waits as many seconds as
it holds before answering (a call a test can kill the caller in the middle of); ``--refuse-file PATH``:
while that file exists the server refuses to start (exit 3), so a stdio server can be kept "down" by a
test although its client starts it again and again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

CUSTOMERS = {
    "acme.io": {"name": "Acme", "tier": "gold", "account_manager": "ada@example.com"},
    "globex.com": {"name": "Globex", "tier": "silver", "account_manager": "grace@example.com"},
}


def build(record: Path, delay_file: Path | None, transport: str = "stdio") -> MCPServer:
    server = MCPServer("helpdesk")

    def note(entry: dict[str, object]) -> None:
        with record.open("a", encoding="utf-8") as out:
            out.write(json.dumps({**entry, "transport": transport, "pid": os.getpid(), "at": time.time()}) + "\n")
            out.flush()
            os.fsync(out.fileno())

    @server.tool()
    async def create_ticket(
        subject: Annotated[str, Field(description="one line saying what the ticket is about")],
        customer: Annotated[str, Field(description="the customer's domain, e.g. acme.io")],
        priority: Annotated[str, Field(description="low, normal or high")] = "normal",
        request_id: Annotated[str, Field(description="idempotency key: a repeat with the same id is a replay")] = "",
    ) -> dict[str, object]:
        """Open a support ticket for a customer; answers the ticket's id."""
        call = uuid.uuid4().hex[:12]
        arguments = {"subject": subject, "customer": customer, "priority": priority, "request_id": request_id}
        note({"call": call, "tool": "create_ticket", "event": "started", "arguments": arguments})
        if delay_file is not None and delay_file.exists():
            await asyncio.sleep(float(delay_file.read_text() or "0"))
        ticket = f"T-{call[:6].upper()}"
        note({"call": call, "tool": "create_ticket", "event": "finished", "ticket": ticket, "arguments": arguments})
        return {"ticket_id": ticket, "customer": customer, "priority": priority}

    @server.tool()
    async def lookup_customer(
        domain: Annotated[str, Field(description="the customer's domain, e.g. acme.io")],
    ) -> dict[str, object]:
        """Look a customer up by domain: name, support tier and account manager."""
        call = uuid.uuid4().hex[:12]
        note({"call": call, "tool": "lookup_customer", "event": "started", "arguments": {"domain": domain}})
        found = CUSTOMERS.get(domain, {"name": domain, "tier": "standard", "account_manager": ""})
        note({"call": call, "tool": "lookup_customer", "event": "finished", "arguments": {"domain": domain}})
        return {"domain": domain, **found}

    return server


def calls(record: Path, tool: str | None = None, event: str = "started") -> list[dict[str, object]]:
    """The recorded calls (one entry per call, by the event asked for), oldest first."""
    if not record.exists():
        return []
    entries = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in entries if e["event"] == event and (tool is None or e["tool"] == tool)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--delay-file", type=Path)
    parser.add_argument("--refuse-file", type=Path)
    args = parser.parse_args(argv)
    if args.refuse_file is not None and args.refuse_file.exists():
        print(f"refusing to start: {args.refuse_file} exists", file=sys.stderr)
        return 3
    server = build(args.record, args.delay_file, args.transport)
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
