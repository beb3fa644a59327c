"""The idempotency ledger: one row per command id, in PostgreSQL.

A command whose row is final (succeeded/failed) is never executed again: its recorded result
event is published instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from streamagent.config import Settings


@dataclass(frozen=True)
class LedgerEntry:
    status: str
    attempts: int
    result_event: bytes | None

    @property
    def final(self) -> bool:
        return self.status in ("succeeded", "failed")


class Ledger:
    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, settings: Settings) -> Ledger:
        return cls(await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True))

    async def begin(self, command_id: str, tool: str, run_id: str, step: str) -> LedgerEntry:
        """Claim the command (or find it); returns the row as it now stands."""
        cur = await self.conn.execute(
            "INSERT INTO tool_ledger (command_id, tool, run_id, step, status) VALUES (%s,%s,%s,%s,'running')"
            " ON CONFLICT (command_id) DO UPDATE SET updated_at = now()"
            " RETURNING status, attempts, result_event",
            (command_id, tool, run_id, step),
        )
        row = await cur.fetchone()
        assert row is not None
        return LedgerEntry(row[0], row[1], bytes(row[2]) if row[2] is not None else None)

    async def attempt(self, command_id: str) -> None:
        await self.conn.execute(
            "UPDATE tool_ledger SET attempts = attempts + 1, updated_at = now() WHERE command_id = %s",
            (command_id,),
        )

    async def finish(self, command_id: str, status: str, result_event: bytes) -> None:
        await self.conn.execute(
            "UPDATE tool_ledger SET status=%s, result_event=%s, updated_at=now() WHERE command_id=%s",
            (status, result_event, command_id),
        )

    async def decision_known(self, decision_id: str) -> bool:
        cur = await self.conn.execute("SELECT 1 FROM decisions WHERE decision_id = %s LIMIT 1", (decision_id,))
        return await cur.fetchone() is not None

    async def close(self) -> None:
        await self.conn.close()
