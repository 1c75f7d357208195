"""A run's started_at is when it was claimed, not when the claiming statement or transaction
began: two runs of one workspace never overlap in their recorded times (seen once in CI, where
a claim's `now()` fell 0.2 ms before the previous run's finish on a loaded machine)."""

from __future__ import annotations

import asyncpg

from registry.db import reconciles
from tests.lock_support import connect, insert_workspace

BUDGET = reconciles.RestartBudget(limit=10, window_s=3600.0)


async def test_a_run_claimed_after_the_previous_one_finished_starts_after_it(
    dsn: str, db: asyncpg.Connection
) -> None:
    workspace_id, _ = await insert_workspace(db, "online")
    await reconciles.queue_reconcile(db, workspace_id, "manual")
    runner, claimer = await connect(dsn), await connect(dsn)
    [first] = await reconciles.claim_due(runner, "one", 60.0, 10, [], 5)
    # Queued while the first runs: due at once, claimable once the first has finished.
    follow_up = await reconciles.queue_reconcile(db, workspace_id, "manual")
    try:
        # The claimer's transaction (and so its now()) begins before the first run finishes;
        # its claim statement runs after.
        transaction = claimer.transaction()
        await transaction.start()
        await claimer.execute("SELECT 1")
        await reconciles.finish(
            runner, first.id, "one", reconciles.Outcome("succeeded", None), budget=BUDGET
        )
        [second] = await reconciles.claim_due(claimer, "two", 60.0, 10, [], 5)
        await transaction.commit()
    finally:
        await runner.close()
        await claimer.close()

    assert second.id == follow_up
    rows = {
        r["id"]: r
        for r in await db.fetch(
            "SELECT id, started_at, finished_at FROM reconciles WHERE workspace_id = $1",
            workspace_id,
        )
    }
    assert rows[first.id]["started_at"] < rows[first.id]["finished_at"]
    assert rows[first.id]["finished_at"] <= rows[second.id]["started_at"]
