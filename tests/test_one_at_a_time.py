"""The database's backstops for "one at a time": the one-running-run index and the advisory
locks of the sweeper and the event sequencer, each raced on two real connections with the
real functions, the interleaving held by the database. Each test fails with its backstop
removed."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from registry.db import events, reconciles
from registry.liveness import SweepPolicy, sweep
from tests.lock_support import blocked_or_done, connect, insert_workspace


async def test_a_claim_racing_another_running_run_of_the_workspace_claims_nothing(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Mutant: no `reconciles_one_running_idx`. Another writer has a run of the workspace
    running, not yet committed (invisible to the claim's NOT EXISTS): the claim must wait for
    it and then claim nothing, never start a second run of the workspace."""
    workspace_id, _ = await insert_workspace(db, "online")
    first = await db.fetchval(
        "INSERT INTO reconciles (workspace_id, trigger, status, finished_at) "
        "VALUES ($1, 'manual', 'failed', now()) RETURNING id",
        workspace_id,
    )
    queued = await reconciles.queue_reconcile(db, workspace_id, "manual")
    writer, claimer = await connect(dsn), await connect(dsn)
    try:
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(
            "UPDATE reconciles SET status = 'running', lease_owner = 'writer', "
            "lease_expires_at = now() + interval '1 hour' WHERE id = $1",
            first,
        )
        claim = asyncio.ensure_future(reconciles.claim_due(claimer, "claimer", 60.0, 10, [], 5))
        waited = await blocked_or_done(db, claimer, claim)
        await transaction.commit()
        claimed = await asyncio.wait_for(claim, 20)
    finally:
        await writer.close()
        await claimer.close()

    assert waited, "the claim did not wait for the other running run"
    assert claimed == []
    running = await db.fetch("SELECT id FROM reconciles WHERE status = 'running'")
    assert [r["id"] for r in running] == [first]
    assert await db.fetchval("SELECT status FROM reconciles WHERE id = $1", queued) == "queued"


async def test_two_claimers_at_once_never_claim_one_run_or_one_workspace_twice(
    dsn: str, db: asyncpg.Connection
) -> None:
    """The claim statement's own guarantee (SKIP LOCKED, and NOT EXISTS a running run): with
    one claimer's claims not yet committed, a second claims none of them, does not wait, and
    takes neither a queued follow-up of a workspace being claimed nor a lapsed run twice."""
    workspaces = [(await insert_workspace(db, "online"))[0] for _ in range(3)]
    due = [await reconciles.queue_reconcile(db, w, "manual") for w in workspaces]
    lapsed = await db.fetchval(
        "UPDATE reconciles SET status = 'running', attempt = 1, lease_owner = 'dead', "
        "lease_expires_at = now() - interval '1 second' WHERE id = $1 RETURNING id",
        due[0],
    )
    follow_up = await reconciles.queue_reconcile(db, workspaces[0], "manual")
    one, two = await connect(dsn), await connect(dsn)
    try:
        claiming = one.transaction()
        await claiming.start()
        first = await reconciles.claim_due(one, "one", 60.0, 10, [], 5)
        racing = asyncio.ensure_future(reconciles.claim_due(two, "two", 60.0, 10, [], 5))
        waited = await blocked_or_done(db, two, racing)
        second = await asyncio.wait_for(racing, 20)
        await claiming.commit()
        after = await reconciles.claim_due(two, "two", 60.0, 10, [], 5)
    finally:
        await one.close()
        await two.close()

    assert not waited
    assert sorted(c.id for c in first) == sorted([lapsed, *due[1:]])
    assert (second, after) == ([], [])
    running = await db.fetch(
        "SELECT workspace_id, count(*) AS n FROM reconciles WHERE status = 'running' "
        "GROUP BY workspace_id"
    )
    assert sorted((r["workspace_id"], r["n"]) for r in running) == sorted(
        (w, 1) for w in workspaces
    )
    assert await db.fetchval("SELECT status FROM reconciles WHERE id = $1", follow_up) == "queued"


POLICY = SweepPolicy(
    offline_after_s=1.0,
    provision_timeout_s=3600.0,
    mass_expiry_share=0.5,
    mass_expiry_min_fleet=10,
    mass_expiry_rate=0.1,
)


async def test_two_sweepers_at_once_expire_one_sweeps_share_with_one_guard_event(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Mutant: no sweep advisory lock. The whole fleet is silent, so the guard holds and one
    sweep may expire 10% of it; two sweeps at once must not expire twice that, nor record
    the guard tripping twice."""
    fleet = [(await insert_workspace(db, "online"))[0] for _ in range(20)]
    await db.execute(
        "UPDATE workspaces SET last_heartbeat_at = now() - interval '1 hour' "
        "WHERE id = ANY($1::uuid[])",
        fleet,
    )
    # Silent for an hour as far as the guard knows (a steady count): holding, it expires at
    # its rate at once rather than waiting out a window of a changing count.
    await db.execute(
        "UPDATE fleet_guard SET stale = $1, silent_changed_at = now() - interval '1 hour'",
        len(fleet),
    )
    holder, one, two = await connect(dsn), await connect(dsn), await connect(dsn)
    try:
        # The barrier: the guard's row, which every sweep writes once it has the sweep lock.
        barrier = holder.transaction()
        await barrier.start()
        await holder.execute("SELECT 1 FROM fleet_guard FOR UPDATE")
        first = asyncio.ensure_future(sweep(one, POLICY))
        assert await blocked_or_done(db, one, first)
        second = asyncio.ensure_future(sweep(two, POLICY))
        second_blocked = await blocked_or_done(db, two, second)
        await barrier.rollback()
        results = await asyncio.wait_for(asyncio.gather(first, second), 20)
    finally:
        for conn in (holder, one, two):
            await conn.close()

    assert not second_blocked, "a second sweep ran alongside the first"
    assert [r.swept for r in results] == [True, False]
    offline = await db.fetchval("SELECT count(*) FROM workspaces WHERE status = 'offline'")
    assert offline == 2  # floor(0.1 * 20)
    guard_events = await db.fetchval(
        "SELECT count(*) FROM workspace_events WHERE cause = 'mass_expiry_guard_holding'"
    )
    assert guard_events == 1


async def insert_event(conn: asyncpg.Connection, workspace_id: uuid.UUID, cause: str) -> None:
    await conn.execute(
        "INSERT INTO workspace_events (workspace_id, kind, cause, actor) "
        "VALUES ($1, 'reconcile', $2, 'test')",
        workspace_id,
        cause,
    )


async def test_two_sequencers_at_once_never_give_one_number_twice(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Mutant: no sequencer advisory lock. A sequencer whose numbers are not committed yet
    and a second one that sees a late event: the second would number it from the same top,
    and give out the first one's number again."""
    workspace_id, _ = await insert_workspace(db, "online")
    late_writer, one, two = await connect(dsn), await connect(dsn), await connect(dsn)
    try:
        late = late_writer.transaction()
        await late.start()
        await insert_event(late_writer, workspace_id, "late")  # a lower id, committed later
        await insert_event(db, workspace_id, "early")
        # The first sequencer numbers `early` and has not committed yet.
        numbering = one.transaction()
        await numbering.start()
        first = await events.sequence_pending(one)
        await late.commit()
        second = asyncio.ensure_future(events.sequence_pending(two, batch=1))
        second_blocked = await blocked_or_done(db, two, second)
        await numbering.commit()
        second_result = await asyncio.wait_for(second, 20)
        # Once the first committed, the next round numbers the late event after it.
        third = await events.sequence_pending(two)
    finally:
        for conn in (late_writer, one, two):
            await conn.close()

    assert not second_blocked, "a second sequencer ran alongside the first"
    assert (first, second_result, third) == (1, None, 2)
    numbered = await db.fetch("SELECT cause, seq FROM workspace_events ORDER BY seq")
    assert [(r["cause"], r["seq"]) for r in numbered] == [("early", 1), ("late", 2)]
