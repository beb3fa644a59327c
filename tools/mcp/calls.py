"""Which MCP calls were started: the record that makes a non-idempotent MCP tool at-most-once.

The ledger (``tools/sdk/ledger.py``) records a command's *result*; a crash between sending a call
and recording its result leaves the ledger row unfinished, and a plain tool then calls again under
the same idempotency key. An MCP tool's server takes no such key unless its config names one, so
before a call is sent its command id is written here (committed). A command found here with no
result in the ledger was sent by an earlier attempt whose outcome nobody saw: it is reported as an
``unknown-outcome`` failure and never sent again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from streamagent.tools.sdk.errors import RetryableError

from streamagent import db

SCHEMA = db.Schema(
    "mcp_calls",
    (
        """
        CREATE TABLE IF NOT EXISTS mcp_calls (
            command_id text PRIMARY KEY,
            tool       text NOT NULL,
            server     text NOT NULL,
            run_id     text NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now()
        )
        """,
    ),
)

START_SQL = """
INSERT INTO mcp_calls (command_id, tool, server, run_id) VALUES (%s, %s, %s, %s)
ON CONFLICT (command_id) DO NOTHING RETURNING started_at
"""


class CallLog:
    def __init__(self, database_url: str) -> None:
        self._db = db.AsyncReconnecting(database_url)

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            conn = await self._db.conn()
            cursor = await conn.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []
        except psycopg.Error as exc:
            await self._db.discard()
            # Nothing was sent to the server yet: the SDK may retry (an outage waits, as for any tool).
            raise RetryableError(f"could not record the MCP call in PostgreSQL: {exc!r}") from exc

    async def start(self, command_id: str, tool: str, server: str, run_id: str) -> datetime | None:
        """Record that the call is about to be sent: None if this is its first start, else when the
        earlier start was recorded (that call's outcome is unknown)."""
        if await self._execute(START_SQL, (command_id, tool, server, run_id)):
            return None
        rows = await self._execute("SELECT started_at FROM mcp_calls WHERE command_id = %s", (command_id,))
        return rows[0][0] if rows else None

    async def forget(self, command_id: str) -> None:
        """Take a start back: the call was never sent (the server was not connected)."""
        await self._execute("DELETE FROM mcp_calls WHERE command_id = %s", (command_id,))

    async def close(self) -> None:
        await self._db.discard()
