"""Retention statements: each deletes one bounded batch, found through an index.

A batch is one short transaction: it locks only the rows it deletes (SKIP LOCKED passes over
rows a heartbeat or a reconcile holds) and writes a bounded amount of WAL. Walks that must pass
over rows they keep (the last N events or runs of a workspace) take a cursor, so the next batch
starts where this one stopped instead of re-reading what it kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from registry.db import Connection

# Events in sequence order after the cursor. A row goes when it is older than the retention
# age and its workspace has at least `keep` newer events (fleet events have no workspace and
# go by age alone). The pass stops at the first batch holding no event older than the cutoff:
# `at` follows `seq` (up to commit reordering, seconds), so the rest of the log is young.
PRUNE_EVENTS = """
WITH examined AS (
    SELECT id, seq, workspace_id, at FROM workspace_events
    WHERE seq > $1
    ORDER BY seq
    LIMIT $2
),
doomed AS (
    SELECT e.id, e.seq FROM examined e
    WHERE e.at < now() - make_interval(secs => $3)
      AND (e.workspace_id IS NULL OR EXISTS (
          SELECT 1 FROM workspace_events newer
          WHERE newer.workspace_id = e.workspace_id AND newer.seq > e.seq
          ORDER BY newer.seq
          OFFSET $4 - 1 LIMIT 1))
),
gone AS (
    DELETE FROM workspace_events w USING doomed d WHERE w.id = d.id RETURNING w.seq
),
mark AS (
    UPDATE retention_state SET events_pruned_through = GREATEST(
        events_pruned_through, (SELECT max(seq) FROM gone))
    WHERE EXISTS (SELECT 1 FROM gone)
)
SELECT (SELECT max(seq) FROM examined) AS last_seq,
       (SELECT count(*) FROM examined) AS examined,
       (SELECT count(*) FROM gone) AS deleted,
       NOT EXISTS (SELECT 1 FROM examined WHERE at < now() - make_interval(secs => $3)) AS done
"""


@dataclass(frozen=True, slots=True)
class EventBatch:
    cursor: int  # the highest seq examined: where the next batch starts
    deleted: int
    done: bool  # reached the young end of the log: this pass is over


async def prune_events(
    conn: Connection, *, after: int, batch: int, retention_s: float, keep: int
) -> EventBatch:
    row = await conn.fetchrow(PRUNE_EVENTS, after, batch, retention_s, keep)
    assert row is not None
    done = bool(row["done"]) or row["examined"] < batch
    cursor = after if row["last_seq"] is None else int(row["last_seq"])
    return EventBatch(cursor, int(row["deleted"]), done)


# Finished runs in finishing order after the (finished_at, id) cursor. A run goes when it
# finished before the cutoff and its workspace has at least `keep` newer runs, so the last
# run of a workspace, and queued or running ones, always stay. Steps go with their run.
PRUNE_RUNS = """
WITH examined AS (
    SELECT id, workspace_id, created_at, finished_at FROM reconciles
    WHERE status IN ('succeeded', 'failed') AND (finished_at, id) > ($1, $2)
    ORDER BY finished_at, id
    LIMIT $3
),
doomed AS (
    SELECT r.id FROM reconciles r JOIN examined e ON e.id = r.id
    WHERE e.finished_at < now() - make_interval(secs => $4)
      AND EXISTS (
          SELECT 1 FROM reconciles newer
          WHERE newer.workspace_id = e.workspace_id AND newer.created_at > e.created_at
          ORDER BY newer.created_at DESC
          OFFSET $5 - 1 LIMIT 1)
    FOR UPDATE OF r SKIP LOCKED
),
steps AS (
    DELETE FROM reconcile_steps s USING doomed d WHERE s.reconcile_id = d.id RETURNING 1
),
runs AS (
    DELETE FROM reconciles r USING doomed d WHERE r.id = d.id RETURNING 1
)
SELECT last.finished_at AS last_at, last.id AS last_id,
       (SELECT count(*) FROM examined) AS examined,
       (SELECT count(*) FROM runs) AS runs,
       (SELECT count(*) FROM steps) AS steps,
       NOT EXISTS (SELECT 1 FROM examined
                   WHERE finished_at < now() - make_interval(secs => $4)) AS done
FROM (SELECT NULL) AS one
LEFT JOIN (SELECT finished_at, id FROM examined ORDER BY finished_at DESC, id DESC LIMIT 1)
    AS last ON true
"""

EPOCH = datetime.fromisoformat("1970-01-01T00:00:00+00:00")
NIL_UUID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True, slots=True)
class RunCursor:
    finished_at: datetime = EPOCH
    id: str = NIL_UUID


@dataclass(frozen=True, slots=True)
class RunBatch:
    cursor: RunCursor
    runs: int
    steps: int
    done: bool


async def prune_runs(
    conn: Connection, *, after: RunCursor, batch: int, retention_s: float, keep: int
) -> RunBatch:
    row = await conn.fetchrow(PRUNE_RUNS, after.finished_at, after.id, batch, retention_s, keep)
    assert row is not None
    cursor = after if row["last_id"] is None else RunCursor(row["last_at"], str(row["last_id"]))
    done = bool(row["done"]) or row["examined"] < batch
    return RunBatch(cursor, int(row["runs"]), int(row["steps"]), done)


PRUNE_ACTIONS = """
WITH doomed AS (
    SELECT id FROM workspace_actions
    WHERE acked_at IS NOT NULL AND acked_at < now() - make_interval(secs => $1)
    ORDER BY acked_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM workspace_actions a USING doomed d WHERE a.id = d.id
"""


async def prune_actions(conn: Connection, *, batch: int, retention_s: float) -> int:
    status = await conn.execute(PRUNE_ACTIONS, retention_s, batch)
    return int(str(status).rsplit(" ", 1)[1])


# Tombstones removed before the cutoff, oldest first, with everything that was theirs: their
# events, plugin records and report, runs (steps go by cascade) and actions, in the same
# statement (none has a foreign key to the tombstone, migrations 0017 and 0019). Once the row
# is gone the workspace's token matches nothing: 401 instead of 410. Only a refusal being
# recorded on it holds a tombstone's row: passed over, like any row someone holds.
PRUNE_TOMBSTONES = """
WITH doomed AS (
    SELECT id FROM removed_workspaces
    WHERE status_changed_at < now() - make_interval(secs => $1)
    ORDER BY status_changed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
events AS (
    DELETE FROM workspace_events e USING doomed d WHERE e.workspace_id = d.id RETURNING e.seq
),
mark AS (
    UPDATE retention_state SET events_pruned_through = GREATEST(
        events_pruned_through, (SELECT max(seq) FROM events))
    WHERE EXISTS (SELECT 1 FROM events WHERE seq IS NOT NULL)
),
declared AS (DELETE FROM declared_plugins p USING doomed d WHERE p.workspace_id = d.id),
installed AS (DELETE FROM installed_plugins p USING doomed d WHERE p.workspace_id = d.id),
reported AS (DELETE FROM reported_plugins p USING doomed d WHERE p.workspace_id = d.id),
actions AS (DELETE FROM workspace_actions a USING doomed d WHERE a.workspace_id = d.id),
runs AS (DELETE FROM reconciles r USING doomed d WHERE r.workspace_id = d.id),
gone AS (
    DELETE FROM removed_workspaces w USING doomed d WHERE w.id = d.id RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS workspaces, (SELECT count(*) FROM events) AS events
"""


@dataclass(frozen=True, slots=True)
class TombstoneBatch:
    workspaces: int
    events: int


async def prune_tombstones(conn: Connection, *, batch: int, retention_s: float) -> TombstoneBatch:
    row = await conn.fetchrow(PRUNE_TOMBSTONES, retention_s, batch)
    assert row is not None
    return TombstoneBatch(int(row["workspaces"]), int(row["events"]))


SELECT_PRUNED_THROUGH = "SELECT events_pruned_through FROM retention_state"


async def events_pruned_through(conn: Connection) -> int:
    """The highest event seq pruning deleted; a resume at or below it may have gaps."""
    return int(await conn.fetchval(SELECT_PRUNED_THROUGH) or 0)
