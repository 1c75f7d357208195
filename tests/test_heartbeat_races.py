"""The heartbeat statement under races it must win by construction, interleaved by the database.

Each test holds one transaction open and waits (pg_stat_activity) until the other is queued
behind it, so the order is the database's, never the machine's speed. Each fails on the
mutant named in its docstring.
"""

from __future__ import annotations

import asyncio

import asyncpg

from registry.db.heartbeats import BeatResult, apply_beat, apply_beats
from registry.db.pool import init_connection
from registry.statuses import Status
from tests.lock_support import connect, insert_workspace, wait_blocked
from tests.support import beat


async def test_a_beat_racing_an_uncommitted_flip_sees_online(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Mutant: the statement's target without `FOR UPDATE OF w`: the second beat reads the
    stale `provisioning` and reports the flip a second time."""
    workspace_id, token_hash = await insert_workspace(db)
    first, second = await connect(dsn), await connect(dsn)
    try:
        transaction = first.transaction()
        await transaction.start()
        flipped = await apply_beat(first, beat(workspace_id, token_hash))
        racing = asyncio.ensure_future(apply_beat(second, beat(workspace_id, token_hash)))
        await wait_blocked(db, second)
        await transaction.commit()
        raced: BeatResult = await asyncio.wait_for(racing, 20)
    finally:
        await first.close()
        await second.close()

    assert (flipped.previous_status, flipped.status) == (Status.PROVISIONING, Status.ONLINE)
    assert (raced.previous_status, raced.status) == (Status.ONLINE, Status.ONLINE)
    assert flipped.reconcile_id is not None
    assert raced.reconcile_id is None
    events = await db.fetch(
        "SELECT from_status, to_status FROM workspace_events "
        "WHERE workspace_id = $1 AND kind = 'status' ORDER BY id",
        workspace_id,
    )
    assert [(e["from_status"], e["to_status"]) for e in events] == [("provisioning", "online")]


async def test_overlapping_batches_in_opposite_orders_do_not_deadlock(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Mutant: the target without `ORDER BY w.id`: rows are locked in each batch's order, so
    batch A holds `low` waiting for `high` while batch B holds `high` waiting for `low`
    (asyncpg.DeadlockDetectedError)."""
    (low, low_token), (high, high_token) = sorted(
        [await insert_workspace(db, "online"), await insert_workspace(db, "online")]
    )
    holder, a, b = await connect(dsn), await connect(dsn), await connect(dsn)
    try:
        for batch in (a, b):
            # The plan of a production-sized table: each beat's row through the primary key,
            # in the batch's order (a table of two rows would be hashed in heap order).
            await batch.execute("SET enable_hashjoin = off; SET enable_mergejoin = off")
        # The barrier: `low` is held, so A queues for it first, then B queues behind A.
        barrier = holder.transaction()
        await barrier.start()
        await holder.execute("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE", low)
        batch_a = asyncio.ensure_future(
            apply_beats(a, [beat(low, low_token), beat(high, high_token)])
        )
        await wait_blocked(db, a)
        batch_b = asyncio.ensure_future(
            apply_beats(b, [beat(high, high_token), beat(low, low_token)])
        )
        await wait_blocked(db, b)
        await barrier.rollback()
        results = await asyncio.wait_for(asyncio.gather(batch_a, batch_b), 30)
    finally:
        for conn in (holder, a, b):
            await conn.close()

    assert [[r.status for r in batch] for batch in results] == [[Status.ONLINE] * 2] * 2


async def test_a_beat_acks_only_actions_of_the_beating_workspace(db: asyncpg.Connection) -> None:
    """Mutants: the acking join without `a.workspace_id = b.id`, or without
    `k.workspace_id = b.id`: a beat of one workspace settles another's action, also when both
    beat in one batch."""
    await init_connection(db)  # jsonb as Python values, as the app's pool has it
    (mine, my_token), (theirs, their_token) = (
        await insert_workspace(db, "online"),
        await insert_workspace(db, "online"),
    )
    actions = {
        workspace_id: await db.fetchval(
            "INSERT INTO workspace_actions (workspace_id, type, reason) "
            "VALUES ($1, 'restart', 'plugins installed: p') RETURNING id",
            workspace_id,
        )
        for workspace_id in (mine, theirs)
    }

    # Alone, and then in one batch with the workspace whose action it names.
    alone = await apply_beat(db, beat(mine, my_token, acks=[actions[theirs]]))
    together = await apply_beats(
        db, [beat(mine, my_token, acks=[actions[theirs]]), beat(theirs, their_token)]
    )

    assert [a["id"] for a in alone.actions] == [str(actions[mine])]
    assert [[a["id"] for a in r.actions] for r in together] == [
        [str(actions[mine])],
        [str(actions[theirs])],
    ]
    pending = await db.fetch(
        "SELECT id FROM workspace_actions WHERE acked_at IS NULL ORDER BY workspace_id"
    )
    assert {r["id"] for r in pending} == set(actions.values())

    # Its own action it may ack.
    acked = await apply_beat(db, beat(mine, my_token, acks=[actions[mine]]))
    assert acked.actions == []
    still = await db.fetchval(
        "SELECT acked_at IS NULL FROM workspace_actions WHERE id = $1", actions[theirs]
    )
    assert still
