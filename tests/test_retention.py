"""Retention: what the pruner deletes and keeps, one pruner at a time, and the signal a
resuming event reader gets when history it asked for was pruned.

Ages are controlled by writing timestamps in the past, never by waiting.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from registry.retention import PRUNE_LOCK_KEY, RetentionPolicy, prune
from tests.support import ADMIN, Registry, Workspace
from tests.test_events import all_numbered, open_stream, read_events

DAY = 86400.0


def policy(**changes: float) -> RetentionPolicy:
    values: dict[str, float] = {
        "event_retention_s": DAY,
        "event_keep": 3,
        "reconcile_retention_s": DAY,
        "reconcile_keep": 2,
        "action_retention_s": DAY,
        "tombstone_retention_s": DAY,
        "batch": 4,  # small, so every walk takes several batches
        "pause_s": 0.0,
    }
    values.update(changes)
    return RetentionPolicy(**values)  # type: ignore[arg-type]


async def old_events(db: asyncpg.Connection, workspace_id: uuid.UUID | None, n: int) -> None:
    """n sequenced status events, 10 days old."""
    await db.execute(
        """
        INSERT INTO workspace_events (workspace_id, kind, cause, seq, at)
        SELECT $1, 'status', 'test',
               (SELECT COALESCE(max(seq), 0) FROM workspace_events) + g, now() - interval '10 days'
        FROM generate_series(1, $2) AS g
        """,
        workspace_id,
        n,
    )


async def event_count(db: asyncpg.Connection, workspace_id: uuid.UUID) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM workspace_events WHERE workspace_id = $1", workspace_id
        )
    )


async def test_old_events_go_but_each_workspace_keeps_its_last_n(registry: Registry) -> None:
    busy, quiet = await registry.create_workspace(), await registry.create_workspace()
    await all_numbered(registry)
    db = registry.db
    busy_id, quiet_id = uuid.UUID(busy.id), uuid.UUID(quiet.id)
    await old_events(db, busy_id, 20)
    await old_events(db, quiet_id, 1)
    await old_events(db, None, 5)  # fleet events: by age alone
    await old_events(db, busy_id, 5)

    result = await prune(db, policy())

    assert result.ran
    # busy: its fresh creation event (young: stays) and 25 old ones, of which the 3 newest
    # stay as its last 3.
    assert await event_count(db, busy_id) == 4
    # quiet: 1 old + creation: fewer than keep, both stay.
    assert await event_count(db, quiet_id) == 2
    assert (
        await db.fetchval("SELECT count(*) FROM workspace_events WHERE workspace_id IS NULL") == 0
    )
    assert result.deleted["workspace_events"] == 22 + 5
    newest = await db.fetchval(
        "SELECT max(seq) FROM workspace_events WHERE at < now() - interval '1 day'"
    )
    assert 0 < await db.fetchval("SELECT events_pruned_through FROM retention_state") < newest + 1


async def test_runs_keep_the_last_n_and_never_an_active_one(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    db = registry.db
    ws = uuid.UUID(workspace.id)
    # 6 finished runs 10 days old (with a step each), then one queued run, also old.
    for i in range(6):
        run = await db.fetchval(
            """
            INSERT INTO reconciles (workspace_id, trigger, status, created_at, finished_at)
            VALUES ($1, 'manual', 'succeeded',
                    now() - interval '10 days' + make_interval(secs => $2),
                    now() - interval '10 days' + make_interval(secs => $2))
            RETURNING id
            """,
            ws,
            float(i),
        )
        await db.execute(
            """
            INSERT INTO reconcile_steps (reconcile_id, attempt, plugin, action, status,
                                         started_at, finished_at)
            VALUES ($1, 1, 'p', 'install', 'succeeded', now(), now())
            """,
            run,
        )
    # Not due for an hour: the app's runner (polling every 0.2 s) must not claim it before the
    # statuses are read, which under load it did ('running' instead of 'queued').
    await db.execute(
        """
        INSERT INTO reconciles (workspace_id, trigger, status, created_at, next_attempt_at)
        VALUES ($1, 'manual', 'queued', now() - interval '9 days', now() + interval '1 hour')
        """,
        ws,
    )

    result = await prune(db, policy())

    statuses = [r["status"] for r in await registry.reconciles(workspace)]
    # Kept: the newest finished run (with the queued one it makes the last 2) and the queued.
    assert statuses == ["succeeded", "queued"]
    assert result.deleted["reconciles"] == 5
    assert result.deleted["reconcile_steps"] == 5
    assert await db.fetchval("SELECT count(*) FROM reconcile_steps") == 1


async def test_the_last_run_of_a_workspace_stays_however_old(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await registry.db.execute(
        """
        INSERT INTO reconciles (workspace_id, trigger, status, created_at, finished_at)
        VALUES ($1, 'manual', 'failed', now() - interval '99 days', now() - interval '99 days')
        """,
        uuid.UUID(workspace.id),
    )
    await prune(registry.db, policy(reconcile_keep=1))
    assert len(await registry.reconciles(workspace)) == 1


async def test_acknowledged_actions_go_after_their_age_pending_ones_stay(
    registry: Registry,
) -> None:
    workspace = await registry.create_workspace()
    db = registry.db
    ws = uuid.UUID(workspace.id)
    await db.execute(
        """
        INSERT INTO workspace_actions (workspace_id, type, reason, created_at, acked_at)
        VALUES ($1, 'restart', 'old acked', now() - interval '10 days', now() - interval '10 days'),
               ($1, 'restart', 'new acked', now(), now()),
               ($1, 'restart', 'old pending', now() - interval '10 days', NULL)
        """,
        ws,
    )
    result = await prune(db, policy())
    reasons = {r["reason"] for r in await db.fetch("SELECT reason FROM workspace_actions")}
    assert reasons == {"new acked", "old pending"}
    assert result.deleted["workspace_actions"] == 1


async def removed_since(registry: Registry, workspace: Workspace, days: float) -> None:
    await registry.set_status(workspace, "removed")
    await registry.db.execute(
        "UPDATE removed_workspaces SET status_changed_at = now() - make_interval(days => $2)"
        " WHERE id = $1",
        uuid.UUID(workspace.id),
        int(days),
    )


async def heartbeat_code(registry: Registry, workspace: Workspace) -> int:
    response = await registry.client.post(
        "/registry/heartbeat", json={"workspace_id": workspace.id}, headers=workspace.auth
    )
    return response.status


async def test_a_tombstone_answers_410_until_its_retention_ends_then_401(
    registry: Registry,
) -> None:
    old, recent = await registry.create_workspace(), await registry.create_workspace()
    await removed_since(registry, old, 40)
    await removed_since(registry, recent, 2)
    assert await heartbeat_code(registry, old) == 410

    result = await prune(registry.db, policy(tombstone_retention_s=30 * DAY))

    assert result.deleted["workspaces"] == 1
    assert await heartbeat_code(registry, old) == 401
    assert await heartbeat_code(registry, recent) == 410
    # Its events went with it: no orphans left behind.
    assert await event_count(registry.db, uuid.UUID(old.id)) == 0
    response = await registry.client.get(f"/workspaces/{old.id}", headers=ADMIN)
    assert response.status == 404


# Everything that belongs to a workspace, by table (none has a foreign key to it: its rows
# outlive the move to removed_workspaces and go when the tombstone is pruned).
OWNED = {
    "workspace_events": "SELECT count(*) FROM workspace_events WHERE workspace_id = $1",
    "declared_plugins": "SELECT count(*) FROM declared_plugins WHERE workspace_id = $1",
    "installed_plugins": "SELECT count(*) FROM installed_plugins WHERE workspace_id = $1",
    "reconciles": "SELECT count(*) FROM reconciles WHERE workspace_id = $1",
    "reconcile_steps": "SELECT count(*) FROM reconcile_steps s JOIN reconciles r"
    " ON r.id = s.reconcile_id WHERE r.workspace_id = $1",
    "workspace_actions": "SELECT count(*) FROM workspace_actions WHERE workspace_id = $1",
}


async def owned_rows(db: asyncpg.Connection, workspace_id: uuid.UUID) -> dict[str, int]:
    return {table: int(await db.fetchval(sql, workspace_id)) for table, sql in OWNED.items()}


async def with_history(registry: Registry) -> Workspace:
    """A workspace with a row in every table that belongs to it."""
    workspace = await registry.create_workspace()
    ws = uuid.UUID(workspace.id)
    await registry.db.execute(
        """
        WITH declared AS (
            INSERT INTO declared_plugins (workspace_id, name, source, position)
            VALUES ($1, 'a', 'file:///srv/plugins/a', 1)
        ),
        run AS (
            INSERT INTO reconciles (workspace_id, trigger, status, finished_at)
            VALUES ($1, 'manual', 'succeeded', now()) RETURNING id
        ),
        step AS (
            INSERT INTO reconcile_steps (reconcile_id, attempt, plugin, action, status, source,
                                         started_at, finished_at)
            SELECT id, 1, 'a', 'install', 'succeeded', 'file:///srv/plugins/a', now(), now()
            FROM run
        ),
        installed AS (
            INSERT INTO installed_plugins (workspace_id, name, source, sha)
            VALUES ($1, 'a', 'file:///srv/plugins/a', 'abc')
        )
        INSERT INTO workspace_actions (workspace_id, type, reason, reconcile_id)
        SELECT $1, 'restart', 'installed a', id FROM run
        """,
        ws,
    )
    assert all((await owned_rows(registry.db, ws)).values())
    return workspace


async def test_a_removed_workspace_leaves_the_live_table_with_its_history_readable(
    registry: Registry,
) -> None:
    workspace = await with_history(registry)
    ws = uuid.UUID(workspace.id)
    before = await owned_rows(registry.db, ws)

    response = await registry.client.delete(f"/workspaces/{workspace.id}", headers=ADMIN)

    assert response.status == 204
    assert await registry.db.fetchval("SELECT count(*) FROM workspaces WHERE id = $1", ws) == 0
    tomb = await registry.db.fetchval("SELECT status FROM removed_workspaces WHERE id = $1", ws)
    assert tomb == "removed"
    after = await owned_rows(registry.db, ws)
    assert after == {**before, "workspace_events": before["workspace_events"] + 1}
    shown = await registry.show(workspace)
    assert shown["status"] == "removed"
    assert [p["name"] for p in shown["declared_plugins"]] == ["a"]
    assert [p["name"] for p in shown["installed_plugins"]] == ["a"]
    runs = await registry.client.get(
        f"/internal/workspaces/{workspace.id}/reconciles", headers=ADMIN
    )
    assert runs.status == 200
    assert len((await runs.json())["reconciles"]) == 1


async def test_a_pruned_tombstone_takes_everything_of_its_workspace_with_it(
    registry: Registry,
) -> None:
    old, kept = await with_history(registry), await with_history(registry)
    await removed_since(registry, old, 40)

    await prune(registry.db, policy(tombstone_retention_s=30 * DAY))

    assert set((await owned_rows(registry.db, uuid.UUID(old.id))).values()) == {0}
    assert all((await owned_rows(registry.db, uuid.UUID(kept.id))).values())


async def test_one_pruner_at_a_time(registry: Registry, dsn: str) -> None:
    other = await asyncpg.connect(dsn)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", PRUNE_LOCK_KEY)
        assert not (await prune(registry.db, policy())).ran
        await other.execute("SELECT pg_advisory_unlock($1)", PRUNE_LOCK_KEY)
        assert (await prune(registry.db, policy())).ran
    finally:
        await other.close()


async def test_pruning_does_not_block_a_heartbeat_holding_a_row(
    registry: Registry, dsn: str
) -> None:
    """A row locked by another transaction (a heartbeat, a reconcile) is passed over."""
    workspace = await registry.create_workspace()
    await removed_since(registry, workspace, 40)
    holder = await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            # What a refusal being recorded on the tombstone holds (registry/refusals.py).
            await holder.execute(
                "SELECT 1 FROM removed_workspaces WHERE id = $1 FOR UPDATE",
                uuid.UUID(workspace.id),
            )
            result = await asyncio.wait_for(prune(registry.db, policy()), 5)
            assert result.deleted["workspaces"] == 0
        assert (await prune(registry.db, policy())).deleted["workspaces"] == 1
    finally:
        await holder.close()


async def test_a_resume_before_pruned_history_gets_410_history_pruned(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await all_numbered(registry)
    ws = uuid.UUID(workspace.id)
    await old_events(registry.db, ws, 10)
    await prune(registry.db, policy())
    pruned_through = await registry.db.fetchval("SELECT events_pruned_through FROM retention_state")

    stale = await registry.client.get(f"/workspaces/{ws}/events?after=1", headers=ADMIN)
    fresh = await registry.client.get(
        f"/workspaces/{ws}/events?after={pruned_through}", headers=ADMIN
    )

    assert stale.status == 410
    assert (await stale.json())["error"]["code"] == "history_pruned"
    assert fresh.status == 200
    assert all(e["id"] > pruned_through for e in (await fresh.json())["events"])


async def test_a_stream_resume_before_pruned_history_gets_a_reset_event(registry: Registry) -> None:
    workspace = await registry.create_workspace()
    await all_numbered(registry)
    await old_events(registry.db, uuid.UUID(workspace.id), 10)
    await prune(registry.db, policy())
    pruned_through = await registry.db.fetchval("SELECT events_pruned_through FROM retention_state")

    response = await open_stream(registry, **{"Last-Event-ID": "1"})
    try:
        first = (await read_events(response, 1))[0]
    finally:
        response.close()

    assert first == {
        "id": pruned_through,
        "reason": "history_pruned",
        "pruned_through": pruned_through,
    }


async def test_lists_hide_removed_workspaces_unless_asked(registry: Registry) -> None:
    live, gone = await registry.create_workspace(), await registry.create_workspace()
    await registry.set_status(gone, "removed")

    async def ids(query: str) -> set[str]:
        response = await registry.client.get(f"/workspaces{query}", headers=ADMIN)
        assert response.status == 200
        return {w["id"] for w in (await response.json())["workspaces"]}

    assert await ids("") == {live.id}
    assert await ids("?include_removed=true") == {live.id, gone.id}
    assert await ids("?status=removed") == {gone.id}
    bad = await registry.client.get("/workspaces?include_removed=yes", headers=ADMIN)
    assert bad.status == 400
    assert (await bad.json())["error"]["field"] == "include_removed"


async def removed_count(registry: Registry) -> tuple[int, int]:
    """(what /fleet says, what the table holds)."""
    response = await registry.client.get("/fleet", headers=ADMIN)
    assert response.status == 200
    shown = (await response.json())["statuses"].get("removed", 0)
    held = await registry.db.fetchval("SELECT count(*) FROM removed_workspaces")
    return shown, int(held)


async def test_the_tombstone_count_follows_removals_and_pruning(registry: Registry) -> None:
    """/fleet reads a count that triggers keep as tombstones come and go, never the rows."""
    first, second, _ = [await registry.create_workspace() for _ in range(3)]
    assert await removed_count(registry) == (0, 0)
    response = await registry.client.delete(f"/workspaces/{first.id}", headers=ADMIN)
    assert response.status == 204
    await removed_since(registry, second, 40)
    assert await removed_count(registry) == (2, 2)

    await prune(registry.db, policy(tombstone_retention_s=30 * DAY))

    assert await removed_count(registry) == (1, 1)
    await registry.db.execute("TRUNCATE removed_workspaces")
    assert await removed_count(registry) == (0, 0)
