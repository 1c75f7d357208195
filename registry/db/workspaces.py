"""Workspace rows: creating a workspace with its declared plugins, and reading it back."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from registry.db import Connection
from registry.db.events import insert_status_event
from registry.ids import uuid7
from registry.statuses import Status


@dataclass(frozen=True, slots=True)
class DeclaredPlugin:
    name: str
    source: str


@dataclass(frozen=True, slots=True)
class InstalledPlugin:
    name: str
    source: str
    sha: str
    installed_at: datetime


@dataclass(frozen=True, slots=True)
class Workspace:
    id: uuid.UUID
    name: str
    status: Status
    status_changed_at: datetime
    created_at: datetime
    delivery: str
    url: str | None
    agent_card: Any
    last_heartbeat_at: datetime | None
    error_rate: float | None
    sample_error: str | None
    active_tasks: int | None
    uptime_seconds: float | None
    current_task: str | None
    monthly_spend: float | None
    runtime_state: str | None
    observed_plugins: list[dict[str, Any]] | None

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Workspace:
        values = {name: row[name] for name in cls.__slots__}
        values["status"] = Status(row["status"])
        return cls(**values)


WORKSPACE_COLUMNS = """
    id, name, status, status_changed_at, created_at, delivery, url, agent_card,
    last_heartbeat_at, error_rate, sample_error, active_tasks, uptime_seconds, current_task,
    monthly_spend, runtime_state, observed_plugins
"""

INSERT_WORKSPACE = f"""
INSERT INTO workspaces (id, name, status, token_hash, delivery, url)
VALUES ($6, $1, $2, $3, $4, $5)
RETURNING {WORKSPACE_COLUMNS}
"""

INSERT_DECLARED = """
INSERT INTO declared_plugins (workspace_id, name, source, position)
SELECT $1, d.name, d.source, d.position
FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS d(name, source, position)
"""


async def create_workspace(
    conn: Connection,
    *,
    name: str,
    token_hash: bytes,
    delivery: str,
    url: str | None,
    plugins: list[DeclaredPlugin],
) -> Workspace:
    """Insert a provisioning workspace, its declared plugins and its creation event."""
    async with conn.transaction():
        row = await conn.fetchrow(
            INSERT_WORKSPACE, name, Status.PROVISIONING.value, token_hash, delivery, url, uuid7()
        )
        assert row is not None
        workspace = Workspace.from_record(row)
        await conn.execute(
            INSERT_DECLARED,
            workspace.id,
            [p.name for p in plugins],
            [p.source for p in plugins],
        )
        await insert_status_event(
            conn, workspace.id, None, Status.PROVISIONING, cause="created", actor="admin"
        )
    return workspace


SELECT_WORKSPACE = f"SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = $1"


async def get_workspace(conn: Connection, workspace_id: uuid.UUID) -> Workspace | None:
    row = await conn.fetchrow(SELECT_WORKSPACE, workspace_id)
    return None if row is None else Workspace.from_record(row)


DELETE_DECLARED = "DELETE FROM declared_plugins WHERE workspace_id = $1"


async def replace_declared(
    conn: Connection, workspace_id: uuid.UUID, plugins: list[DeclaredPlugin]
) -> None:
    """Replace the declared set; call inside the transaction that queues its reconcile."""
    await conn.execute(DELETE_DECLARED, workspace_id)
    await conn.execute(
        INSERT_DECLARED, workspace_id, [p.name for p in plugins], [p.source for p in plugins]
    )


WORKSPACE_EXISTS = "SELECT EXISTS (SELECT 1 FROM workspaces WHERE id = $1)"


async def workspace_exists(conn: Connection, workspace_id: uuid.UUID) -> bool:
    return bool(await conn.fetchval(WORKSPACE_EXISTS, workspace_id))


SELECT_DECLARED = """
SELECT name, source FROM declared_plugins WHERE workspace_id = $1 ORDER BY position, name
"""


async def declared_plugins(conn: Connection, workspace_id: uuid.UUID) -> list[DeclaredPlugin]:
    rows = await conn.fetch(SELECT_DECLARED, workspace_id)
    return [DeclaredPlugin(row["name"], row["source"]) for row in rows]


SELECT_INSTALLED = """
SELECT name, source, sha, installed_at FROM installed_plugins WHERE workspace_id = $1 ORDER BY name
"""


async def installed_plugins(conn: Connection, workspace_id: uuid.UUID) -> list[InstalledPlugin]:
    rows = await conn.fetch(SELECT_INSTALLED, workspace_id)
    return [InstalledPlugin(r["name"], r["source"], r["sha"], r["installed_at"]) for r in rows]


UPSERT_INSTALLED = """
INSERT INTO installed_plugins (workspace_id, name, source, sha)
VALUES ($1, $2, $3, $4)
ON CONFLICT (workspace_id, name)
DO UPDATE SET source = EXCLUDED.source, sha = EXCLUDED.sha, installed_at = now()
"""


async def record_installed(
    conn: Connection, workspace_id: uuid.UUID, name: str, source: str, sha: str
) -> None:
    """Called only after the plugin's bytes were delivered (DESIGN lesson 7)."""
    await conn.execute(UPSERT_INSTALLED, workspace_id, name, source, sha)


DELETE_INSTALLED = "DELETE FROM installed_plugins WHERE workspace_id = $1 AND name = $2"


async def forget_installed(conn: Connection, workspace_id: uuid.UUID, name: str) -> None:
    """Called only after the plugin was removed from the box."""
    await conn.execute(DELETE_INSTALLED, workspace_id, name)


# Keyset pagination on id: stable under inserts, one index range scan per page. One
# statement per filter shape (never "$1 IS NULL OR status = $1"): each one's generic plan is
# the right one, the first page starts after the nil uuid. Tombstones are left out unless
# asked for, through the partial index of live rows.
FIRST_ID = uuid.UUID(int=0)

SELECT_LIVE_PAGE = f"""
SELECT {WORKSPACE_COLUMNS} FROM workspaces
WHERE status <> 'removed' AND id > $1
ORDER BY id
LIMIT $2
"""

SELECT_ALL_PAGE = f"""
SELECT {WORKSPACE_COLUMNS} FROM workspaces
WHERE id > $1
ORDER BY id
LIMIT $2
"""

SELECT_STATUS_PAGE = f"""
SELECT {WORKSPACE_COLUMNS} FROM workspaces
WHERE status = $3 AND id > $1
ORDER BY status, id
LIMIT $2
"""


async def list_workspaces(
    conn: Connection,
    *,
    status: str | None,
    after: uuid.UUID | None,
    limit: int,
    include_removed: bool = False,
) -> list[Workspace]:
    start = FIRST_ID if after is None else after
    if status is not None:
        rows = await conn.fetch(SELECT_STATUS_PAGE, start, limit, status)
    elif include_removed:
        rows = await conn.fetch(SELECT_ALL_PAGE, start, limit)
    else:
        rows = await conn.fetch(SELECT_LIVE_PAGE, start, limit)
    return [Workspace.from_record(row) for row in rows]


UPDATE_TOKEN = "UPDATE workspaces SET token_hash = $2 WHERE id = $1 AND status <> 'removed'"


async def replace_token(conn: Connection, workspace_id: uuid.UUID, token_hash: bytes) -> bool:
    """The old token stops working the moment this commits."""
    return str(await conn.execute(UPDATE_TOKEN, workspace_id, token_hash)) == "UPDATE 1"
