"""The projection of shared memory: each entity version as a row, for ``memory get`` and ``memory history``."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from streamagent.events import EntityVersion


def project_versions(cur: psycopg.Cursor[Any], versions: list[tuple[EntityVersion, Any]]) -> None:
    """Insert each version once (a batch delivered again changes nothing)."""
    cur.executemany(
        "INSERT INTO memory_versions (entity, key, version, fields, deleted, as_of, writer, write_id,"
        " kafka_partition, kafka_offset) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
        " ON CONFLICT (entity, key, version) DO NOTHING",
        [
            (
                v.entity,
                v.key,
                v.version,
                Jsonb(v.fields),
                v.deleted,
                v.as_of,
                v.writer,
                v.write_id,
                msg.partition(),
                msg.offset(),
            )
            for v, msg in versions
        ],
    )


def history(conn: psycopg.Connection[Any], entity: str, key: str) -> list[dict[str, Any]]:
    """Every version of one entity, oldest first."""
    rows = conn.execute(
        "SELECT version, fields, deleted, as_of, writer, write_id FROM memory_versions"
        " WHERE entity=%s AND key=%s ORDER BY version",
        (entity, key),
    ).fetchall()
    names = ("version", "fields", "deleted", "as_of", "writer", "write_id")
    return [dict(zip(names, row, strict=True)) for row in rows]
