"""Lock order between heartbeats and reconcile bookkeeping: no deadlock by construction.

A heartbeat holds its workspace row and may then wait on an uncommitted queued run of that
workspace (the one-queued-run unique index). These tests hold a workspace the way a heartbeat
does and run the other writers against it; each would deadlock with the opposite lock order.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from registry.db import reconciles
from registry.db.pool import init_connection
from registry.statuses import LIVE_STATUSES

# The heartbeat statement's `intent`, folding the way it does (it locks a queued run it finds).
INSERT_INTENT = """
INSERT INTO reconciles (workspace_id, trigger) VALUES ($1, 'online_transition')
ON CONFLICT (workspace_id) WHERE status = 'queued' DO UPDATE SET
    attempt = 0, error = NULL, next_attempt_at = LEAST(reconciles.next_attempt_at, now())
"""


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    return conn


async def online_workspace(db: asyncpg.Connection) -> uuid.UUID:
    workspace_id: uuid.UUID = await db.fetchval(
        "INSERT INTO workspaces (name, token_hash, status) "
        "VALUES ('w-' || gen_random_uuid(), $1, 'online') RETURNING id",
        uuid.uuid4().bytes * 2,
    )
    await db.execute(
        "INSERT INTO declared_plugins (workspace_id, name, source, position) "
        "VALUES ($1, 'p', 'file:///p', 0)",
        workspace_id,
    )
    return workspace_id


async def test_retry_scheduling_waits_for_a_heartbeat_instead_of_deadlocking(
    dsn: str, db: asyncpg.Connection
) -> None:
    workspace_id = await online_workspace(db)
    run_id = await db.fetchval(
        "INSERT INTO reconciles (workspace_id, trigger, status, lease_owner, attempt) "
        "VALUES ($1, 'manual', 'running', 'me', 1) RETURNING id",
        workspace_id,
    )
    heartbeat, worker = await connect(dsn), await connect(dsn)
    try:
        beat = heartbeat.transaction()
        await beat.start()
        await heartbeat.execute("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE", workspace_id)
        retry = asyncio.ensure_future(
            reconciles.retry_later(worker, run_id, "me", "delivery_failed", 1.0)
        )
        await asyncio.sleep(0.3)  # the retry is now waiting for the workspace row
        await heartbeat.execute(INSERT_INTENT, workspace_id)
        await beat.commit()
        covered_by_follow_up = not await asyncio.wait_for(retry, 10)
    finally:
        await heartbeat.close()
        await worker.close()

    assert covered_by_follow_up
    statuses = await db.fetch("SELECT status FROM reconciles ORDER BY created_at")
    assert [r["status"] for r in statuses] == ["running", "queued"]


async def test_fan_out_waits_for_a_heartbeat_instead_of_deadlocking(
    dsn: str, db: asyncpg.Connection
) -> None:
    first, second = sorted([await online_workspace(db), await online_workspace(db)])
    heartbeat, operator = await connect(dsn), await connect(dsn)
    try:
        beat = heartbeat.transaction()
        await beat.start()
        # A heartbeat batch locks its rows up front, in id order, then queues intents. Fan-out
        # must not hold queued runs of these workspaces while it waits for their rows.
        await heartbeat.execute(
            "SELECT 1 FROM workspaces WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE",
            [first, second],
        )
        fan_out = asyncio.ensure_future(
            reconciles.fan_out_reconciles(
                operator, source="file:///p", name=None, live_statuses=LIVE_STATUSES
            )
        )
        await asyncio.sleep(0.3)
        await heartbeat.execute(INSERT_INTENT, first)
        await heartbeat.execute(INSERT_INTENT, second)
        await beat.commit()
        queued = await asyncio.wait_for(fan_out, 10)
    finally:
        await heartbeat.close()
        await operator.close()

    assert queued == 2
    runs = await db.fetch("SELECT workspace_id, refresh FROM reconciles WHERE status = 'queued'")
    assert sorted((r["workspace_id"], r["refresh"]) for r in runs) == [
        (first, True),
        (second, True),
    ]
