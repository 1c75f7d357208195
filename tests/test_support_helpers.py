"""The test helpers' own promises: waiting for reconciles never waits for a scheduled run."""

from __future__ import annotations

import uuid

import asyncpg

from tests.hostile_support import quiesce
from tests.support import Registry


async def test_settled_and_quiesce_do_not_wait_for_a_run_scheduled_ahead(
    registry: Registry, db: asyncpg.Connection
) -> None:
    workspace = await registry.create_workspace()
    await registry.heartbeat(workspace)
    await registry.settled(workspace)
    # What a runtime restarting right after its last run gets: a run due up to
    # REGISTRY_RESTART_RECONCILE_EVERY_S (5 min) later. The old helpers waited for it.
    await db.execute(
        "INSERT INTO reconciles (workspace_id, trigger, next_attempt_at) "
        "VALUES ($1, 'runtime_restarted', now() + interval '299 seconds')",
        uuid.UUID(workspace.id),
    )

    runs = await registry.settled(workspace, within_s=1.0)
    await quiesce(db, within_s=1.0)

    assert sorted(r["status"] for r in runs) == ["queued", "succeeded"]
