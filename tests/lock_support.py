"""Interleavings controlled by the database: wait until a connection is blocked on a lock.

A test that races two transactions holds one of them open and waits, by asking
pg_stat_activity, until the other is queued behind its locks: no sleep decides the order.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from registry.db.pool import init_connection

# Far longer than a lock wait takes to show up; a wait that never comes fails the test.
BLOCKED_WITHIN_S = 20.0


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    return conn


async def wait_blocked(observer: asyncpg.Connection, blocked: asyncpg.Connection) -> None:
    """Return once `blocked` is waiting for a lock another transaction holds."""
    pid = blocked.get_server_pid()
    async with asyncio.timeout(BLOCKED_WITHIN_S):
        while not await observer.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            await asyncio.sleep(0.01)


async def insert_workspace(
    db: asyncpg.Connection, status: str = "provisioning"
) -> tuple[uuid.UUID, bytes]:
    """A workspace row and its token hash, written directly."""
    token_hash = uuid.uuid4().bytes * 2
    workspace_id: uuid.UUID = await db.fetchval(
        "INSERT INTO workspaces (name, token_hash, status) "
        "VALUES ('w-' || gen_random_uuid(), $1, $2) RETURNING id",
        token_hash,
        status,
    )
    return workspace_id, token_hash


async def blocked_or_done(
    observer: asyncpg.Connection, conn: asyncpg.Connection, task: asyncio.Future[Any]
) -> bool:
    """True once `conn` waits for a lock; False if `task` (running on it) finished first."""
    pid = conn.get_server_pid()
    async with asyncio.timeout(BLOCKED_WITHIN_S):
        while not task.done():
            if await observer.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
            ):
                return True
            await asyncio.sleep(0.01)
    return False


async def wait_blocked_by(observer: asyncpg.Connection, holder: asyncpg.Connection) -> None:
    """Return once some other backend waits for a lock `holder` holds."""
    pid = holder.get_server_pid()
    async with asyncio.timeout(BLOCKED_WITHIN_S):
        while not await observer.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))",
            pid,
        ):
            await asyncio.sleep(0.01)
