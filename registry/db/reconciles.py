"""Reconcile runs and their steps: durable intents, leased claims and terminal writes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from registry.db import Connection
from registry.db.events import insert_reconcile_event
from registry.db.workspaces import is_tombstone
from registry.statuses import Status


@dataclass(frozen=True, slots=True)
class Step:
    plugin: str
    action: str
    status: str
    source: str | None
    sha: str | None
    started_at: datetime
    finished_at: datetime
    error: str | None
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class Reconcile:
    id: uuid.UUID
    workspace_id: uuid.UUID
    trigger: str
    status: str
    refresh: bool
    attempt: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    next_attempt_at: datetime | None
    restart_requested: bool
    restart_withheld: bool
    steps: list[Step] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


RECONCILE_COLUMNS = """
    id, workspace_id, trigger, status, refresh, attempt, created_at, started_at, finished_at,
    error, next_attempt_at, restart_requested, restart_withheld
"""


def _reconcile(row: asyncpg.Record, steps: list[Step] | None = None) -> Reconcile:
    return Reconcile(
        id=row["id"],
        workspace_id=row["workspace_id"],
        trigger=row["trigger"],
        status=row["status"],
        refresh=row["refresh"],
        attempt=row["attempt"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        # Only a queued run has a next attempt; the column's default is not meaningful after.
        next_attempt_at=row["next_attempt_at"] if row["status"] == "queued" else None,
        restart_requested=row["restart_requested"],
        restart_withheld=row["restart_withheld"],
        steps=steps or [],
    )


SELECT_STEPS = """
SELECT plugin, action, status, source, sha, started_at, finished_at, error, attempt
FROM reconcile_steps WHERE reconcile_id = $1 ORDER BY id
"""


async def _steps(conn: Connection, reconcile_id: uuid.UUID) -> list[Step]:
    rows = await conn.fetch(SELECT_STEPS, reconcile_id)
    return [Step(**dict(row)) for row in rows]


SELECT_RECONCILE = f"SELECT {RECONCILE_COLUMNS} FROM reconciles WHERE id = $1"


async def get_reconcile(conn: Connection, reconcile_id: uuid.UUID) -> Reconcile | None:
    row = await conn.fetchrow(SELECT_RECONCILE, reconcile_id)
    if row is None:
        return None
    return _reconcile(row, await _steps(conn, reconcile_id))


SELECT_RECONCILES_FOR_WORKSPACE = f"""
SELECT {RECONCILE_COLUMNS} FROM reconciles WHERE workspace_id = $1
ORDER BY created_at DESC, id DESC LIMIT $2
"""


async def reconciles_for_workspace(
    conn: Connection, workspace_id: uuid.UUID, limit: int
) -> list[Reconcile]:
    rows = await conn.fetch(SELECT_RECONCILES_FOR_WORKSPACE, workspace_id, limit)
    return [_reconcile(row, await _steps(conn, row["id"])) for row in rows]


async def last_reconcile(conn: Connection, workspace_id: uuid.UUID) -> Reconcile | None:
    runs = await reconciles_for_workspace(conn, workspace_id, 1)
    return runs[0] if runs else None


# One index probe per workspace (reconciles_workspace_idx, newest first), not every run of
# the page's workspaces sorted: at 2M runs a page of 100 touched ~2,700 buffers in 70 ms that
# way, ~500 in 6 ms this way (docs/benchmarks.md).
SELECT_LAST_RECONCILES = f"""
SELECT r.* FROM unnest($1::uuid[]) AS w(id)
CROSS JOIN LATERAL (
    SELECT {RECONCILE_COLUMNS} FROM reconciles WHERE workspace_id = w.id
    ORDER BY created_at DESC, id DESC LIMIT 1
) r
"""


async def last_reconciles(
    conn: Connection, workspace_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Reconcile]:
    """The most recent run of each workspace of a page, without its steps."""
    rows = await conn.fetch(SELECT_LAST_RECONCILES, workspace_ids)
    return {row["workspace_id"]: _reconcile(row) for row in rows}


@dataclass(frozen=True, slots=True)
class Claim:
    id: uuid.UUID
    workspace_id: uuid.UUID
    attempt: int
    refresh: bool
    trigger: str
    # The latest request the run answers, and when it was claimed (database clock): a plugin
    # resolution made after the one answers the other (plugins.resolutions).
    requested_at: datetime | None = None
    claimed_at: datetime | None = None


# Due intents, and runs whose owner's lease ran out (that process died mid-run). A queued run
# waits while its workspace has a run in progress: one run per workspace at a time, across
# processes; the partial unique index on running rows backs this up. SKIP LOCKED lets several
# registry processes claim side by side without blocking each other.
CLAIM_DUE = """
UPDATE reconciles r SET
    status = 'running',
    attempt = r.attempt + 1,
    -- clock_timestamp(), not now(): evaluated once the row is claimed, after this statement's
    -- snapshot saw the workspace's previous run finished, so a run never starts before the
    -- previous one finished (now() is when the statement began, which can be earlier).
    started_at = clock_timestamp(),
    lease_owner = $1,
    lease_expires_at = now() + make_interval(secs => $2)
WHERE r.id IN (
    SELECT c.id FROM reconciles c
    WHERE (c.status = 'queued' AND c.next_attempt_at <= now()
           AND NOT EXISTS (SELECT 1 FROM reconciles x
                           WHERE x.workspace_id = c.workspace_id AND x.status = 'running'))
       OR (c.status = 'running' AND c.lease_expires_at < now()
           -- a run this process still executes (it stalled past its lease) is not taken twice
           AND c.id <> ALL($4::uuid[])
           -- a run out of attempts is ended by GIVE_UP_LAPSED instead
           AND c.attempt < $5)
    ORDER BY c.next_attempt_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING r.id, r.workspace_id, r.attempt, r.refresh, r.trigger, r.requested_at,
          now() AS claimed_at
"""


# A run whose owner's lease lapsed on its last allowed attempt (the owner died, or its
# terminal write failed: either way the run never ended) is not taken over once more: it
# ends failed, with its event, so a run that keeps losing its owner cannot run forever.
GIVE_UP_LAPSED = """
WITH lapsed AS (
    SELECT id FROM reconciles
    WHERE status = 'running' AND lease_expires_at < now() AND attempt >= $1
      AND id <> ALL($2::uuid[])
    FOR UPDATE SKIP LOCKED
),
ended AS (
    UPDATE reconciles r SET
        status = 'failed', finished_at = clock_timestamp(),
        lease_owner = NULL, lease_expires_at = NULL,
        error = format('gave up after %s attempts: the lease of the last one lapsed before '
                       'it ended (its process died or could not write its outcome)', r.attempt)
    FROM lapsed l
    WHERE r.id = l.id
    RETURNING r.id, r.workspace_id, r.error
)
INSERT INTO workspace_events (workspace_id, kind, cause, actor, detail)
SELECT workspace_id, 'reconcile', 'reconcile_failed', 'reconciler',
       jsonb_build_object('reconcile_id', id, 'error', error, 'changes', '[]'::jsonb,
                          'restart_requested', false, 'restart_withheld', false)
FROM ended
"""


async def claim_due(
    conn: Connection,
    owner: str,
    lease_s: float,
    limit: int,
    running_here: list[uuid.UUID],
    max_attempts: int,
) -> list[Claim]:
    """Claim up to `limit` due runs; runs out of attempts whose lease lapsed end failed."""
    await conn.execute(GIVE_UP_LAPSED, max_attempts, running_here)
    try:
        rows = await conn.fetch(CLAIM_DUE, owner, lease_s, limit, running_here, max_attempts)
    except asyncpg.UniqueViolationError:
        # Another process claimed a run of the same workspace in the same instant; the
        # index refused the second. Nothing was claimed; the next poll tries again.
        return []
    return [
        Claim(
            r["id"],
            r["workspace_id"],
            r["attempt"],
            r["refresh"],
            r["trigger"],
            r["requested_at"],
            r["claimed_at"],
        )
        for r in rows
    ]


# A run this owner no longer holds was either taken over (another owner holds it now) or
# ended by its own terminal write an instant ago (every such write clears the owner), which
# is not a loss: the run's job just has not returned yet. The SELECT sees the owners as they
# were before this statement's UPDATE, which changes only lease times.
RENEW_LEASES = """
WITH renewed AS (
    UPDATE reconciles SET lease_expires_at = now() + make_interval(secs => $2)
    WHERE lease_owner = $1 AND status = 'running' AND id = ANY($3::uuid[])
    RETURNING id
)
SELECT r.id, r.id IN (SELECT id FROM renewed) AS held,
       r.lease_owner IS NOT NULL AND r.lease_owner <> $1 AS taken
FROM reconciles r
WHERE r.id = ANY($3::uuid[])
"""


@dataclass(frozen=True, slots=True)
class Leases:
    held: set[uuid.UUID]  # renewed
    taken: set[uuid.UUID]  # another owner holds them now: stop them here


async def renew_leases(
    conn: Connection, owner: str, lease_s: float, ids: list[uuid.UUID]
) -> Leases:
    """Extend this owner's leases, and say which of its runs another owner took over."""
    rows = await conn.fetch(RENEW_LEASES, owner, lease_s, ids)
    return Leases(
        held={row["id"] for row in rows if row["held"]},
        taken={row["id"] for row in rows if row["taken"]},
    )


# Give a run back (this process is shutting down): it becomes the queued intent again, due at
# once, unless a queued follow-up already exists, which then covers it.
RELEASE = """
WITH mine AS (
    SELECT id, workspace_id FROM reconciles
    WHERE id = $1 AND lease_owner = $2 AND status = 'running'
    FOR UPDATE
),
follow_up AS (
    SELECT 1 FROM reconciles q, mine
    WHERE q.workspace_id = mine.workspace_id AND q.status = 'queued'
)
UPDATE reconciles r SET
    status = CASE WHEN EXISTS (SELECT 1 FROM follow_up) THEN 'failed' ELSE 'queued' END,
    error = CASE WHEN EXISTS (SELECT 1 FROM follow_up)
                 THEN 'interrupted by shutdown; superseded by a queued run' END,
    finished_at = CASE WHEN EXISTS (SELECT 1 FROM follow_up) THEN clock_timestamp() END,
    next_attempt_at = now(),
    lease_owner = NULL,
    lease_expires_at = NULL
FROM mine WHERE r.id = mine.id
"""


async def release(conn: Connection, reconcile_id: uuid.UUID, owner: str) -> None:
    await conn.execute(RELEASE, reconcile_id, owner)


HELD_BY = "SELECT id FROM reconciles WHERE lease_owner = $1 AND status = 'running' ORDER BY id"


async def release_all(conn: Connection, owner: str) -> int:
    """Give back every run `owner` still holds; how many there were."""
    held = [row["id"] for row in await conn.fetch(HELD_BY, owner)]
    for reconcile_id in held:
        await conn.execute(RELEASE, reconcile_id, owner)
    return len(held)


@dataclass(frozen=True, slots=True)
class StepDone:
    """A step as the runner finished it: how long it took, not when (the database says when)."""

    plugin: str
    action: str
    status: str
    source: str | None
    sha: str | None
    seconds: float
    error: str | None
    attempt: int = 1


# Stamped by the database clock when the step is written, right after it ran: a step's times
# agree with every other time the registry shows, whatever this host's clock says. Only the
# duration is measured here (monotonically).
INSERT_STEP = """
INSERT INTO reconcile_steps
    (reconcile_id, attempt, plugin, action, status, source, sha, started_at, finished_at, error)
VALUES ($1, $2, $3, $4, $5, $6, $7,
        clock_timestamp() - make_interval(secs => $8), clock_timestamp(), $9)
"""


async def insert_step(conn: Connection, reconcile_id: uuid.UUID, step: StepDone) -> None:
    await conn.execute(
        INSERT_STEP,
        reconcile_id,
        step.attempt,
        step.plugin,
        step.action,
        step.status,
        step.source,
        step.sha,
        step.seconds,
        step.error,
    )


# Guarded by the lease: a process that lost its lease (it stalled, another took over) must
# not write over the run's real outcome (DESIGN lesson 3).
FINISH = """
UPDATE reconciles SET
    -- When it ended, not when its transaction began (now()): see CLAIM_DUE.
    status = $3, error = $4, restart_requested = $5, restart_withheld = $6,
    finished_at = clock_timestamp(),
    lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND lease_owner = $2 AND status = 'running'
"""

# Lock order, to rule out deadlocks with heartbeats: a heartbeat holds its workspace row and
# then may wait on an uncommitted queued run of it (the unique index). Anything that makes a
# run queued and then writes a row referencing the workspace (an event: the foreign key
# takes a share lock on it) must lock the workspace first, before the run becomes queued.
LOCK_RUN_WORKSPACE = """
SELECT 1 FROM workspaces
WHERE id = (SELECT workspace_id FROM reconciles WHERE id = $1)
FOR KEY SHARE
"""

# Back to the queue for another attempt, unless a queued follow-up already covers it.
RETRY_LATER = """
UPDATE reconciles r SET
    status = 'queued', error = $3, next_attempt_at = now() + make_interval(secs => $4),
    lease_owner = NULL, lease_expires_at = NULL
WHERE r.id = $1 AND r.lease_owner = $2 AND r.status = 'running'
  AND NOT EXISTS (SELECT 1 FROM reconciles q
                  WHERE q.workspace_id = r.workspace_id AND q.status = 'queued')
RETURNING r.workspace_id
"""

# What this run changed on the box, over all its attempts: the steps are the record.
CHANGED_PLUGINS = """
SELECT action, plugin FROM reconcile_steps
WHERE reconcile_id = $1 AND status = 'succeeded' AND action IN ('install', 'upgrade', 'remove')
ORDER BY id
"""

LOCK_OWN_RUN = """
SELECT workspace_id FROM reconciles
WHERE id = $1 AND lease_owner = $2 AND status = 'running'
FOR UPDATE
"""

# Only a restart not yet handed out can absorb a new install: one handed out may already
# have been carried out, before these plugins were on disk.
PENDING_RESTART = """
SELECT EXISTS (SELECT 1 FROM workspace_actions
               WHERE workspace_id = $1 AND type = 'restart' AND acked_at IS NULL
                 AND delivered_at IS NULL)
"""

RECENT_RESTARTS = """
SELECT count(*) FROM workspace_actions
WHERE workspace_id = $1 AND type = 'restart' AND created_at > now() - make_interval(secs => $2)
"""

REQUEST_RESTART = """
INSERT INTO workspace_actions (workspace_id, type, reason, reconcile_id)
VALUES ($1, 'restart', $2, $3)
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # succeeded | failed
    error: str | None
    # Every failure was of a kind a retry may fix (network, timeouts, a busy runtime).
    transient: bool = False


@dataclass(frozen=True, slots=True)
class RestartBudget:
    limit: int
    window_s: float


@dataclass(frozen=True, slots=True)
class Finished:
    status: str  # succeeded | failed | queued (retry scheduled) | lost (lease was lost)
    restart_requested: bool = False
    restart_withheld: bool = False


def restart_reason(changes: list[tuple[str, str]]) -> str | None:
    installed = [plugin for action, plugin in changes if action != "remove"]
    removed = [plugin for action, plugin in changes if action == "remove"]
    parts = []
    if installed:
        parts.append(f"plugins installed: {', '.join(dict.fromkeys(installed))}")
    if removed:
        parts.append(f"plugins removed: {', '.join(dict.fromkeys(removed))}")
    return "; ".join(parts) or None


async def _request_restart(
    conn: Connection,
    workspace_id: uuid.UUID,
    reconcile_id: uuid.UUID,
    reason: str,
    budget: RestartBudget,
) -> tuple[bool, bool]:
    """Ask the runtime to restart within the budget; returns (requested, withheld)."""
    if await conn.fetchval(PENDING_RESTART, workspace_id):
        return True, False  # the restart not yet handed out will load these plugins too
    recent = await conn.fetchval(RECENT_RESTARTS, workspace_id, budget.window_s)
    if recent >= budget.limit:
        return False, True
    await conn.execute(REQUEST_RESTART, workspace_id, reason, reconcile_id)
    return True, False


async def finish(
    conn: Connection,
    reconcile_id: uuid.UUID,
    owner: str,
    outcome: Outcome,
    *,
    budget: RestartBudget,
) -> Finished:
    """Write the run's terminal status, its restart request and its event in one transaction."""
    async with conn.transaction():
        changes = [
            (r["action"], r["plugin"]) for r in await conn.fetch(CHANGED_PLUGINS, reconcile_id)
        ]
        workspace_id = await conn.fetchval(LOCK_OWN_RUN, reconcile_id, owner)
        if workspace_id is None:
            return Finished("lost")
        requested = withheld = False
        reason = restart_reason(changes)
        if reason is not None:
            requested, withheld = await _request_restart(
                conn, workspace_id, reconcile_id, reason, budget
            )
        await conn.execute(
            FINISH, reconcile_id, owner, outcome.status, outcome.error, requested, withheld
        )
        await insert_reconcile_event(
            conn,
            workspace_id,
            f"reconcile_{outcome.status}",
            {
                "reconcile_id": str(reconcile_id),
                "error": outcome.error,
                "changes": [f"{action} {plugin}" for action, plugin in changes],
                "restart_requested": requested,
                "restart_withheld": withheld,
            },
        )
    return Finished(outcome.status, requested, withheld)


async def retry_later(
    conn: Connection, reconcile_id: uuid.UUID, owner: str, error: str, delay_s: float
) -> bool:
    """Queue the run again for a later attempt; False if a queued follow-up covers it."""
    async with conn.transaction():
        await conn.execute(LOCK_RUN_WORKSPACE, reconcile_id)
        workspace_id = await conn.fetchval(RETRY_LATER, reconcile_id, owner, error, delay_s)
        if workspace_id is None:
            return False
        await insert_reconcile_event(
            conn,
            workspace_id,
            "reconcile_retry_scheduled",
            {"reconcile_id": str(reconcile_id), "error": error, "delay_s": round(delay_s, 3)},
        )
    return True


# A new cause folded into a queued run makes it due now with its full attempt budget, even when
# that run was waiting out the backoff of a failed attempt: whatever failed then (a box since
# replaced, a source since fixed) says little about the new cause. The same reset is spelled
# out in every statement that folds: here, FOLD_MANUAL, FAN_OUT and the heartbeat's intent.
# `attempt` counts claims (each claim adds one), so 0 makes the next claim attempt 1; the
# error of the last attempt stays in its retry event and its steps.
QUEUE_RECONCILE = """
INSERT INTO reconciles (workspace_id, trigger, refresh)
VALUES ($1, $2, $3)
ON CONFLICT (workspace_id) WHERE status = 'queued'
DO UPDATE SET
    refresh = reconciles.refresh OR EXCLUDED.refresh, requested_at = now(),
    attempt = 0, error = NULL, next_attempt_at = LEAST(reconciles.next_attempt_at, now())
RETURNING id
"""


async def queue_reconcile(
    conn: Connection, workspace_id: uuid.UUID, trigger: str, *, refresh: bool = False
) -> uuid.UUID:
    """Commit an intent to reconcile, folded into the one already queued if there is one."""
    value = await conn.fetchval(QUEUE_RECONCILE, workspace_id, trigger, refresh)
    assert isinstance(value, uuid.UUID)
    return value


LOCK_WORKSPACE = "SELECT status FROM workspaces WHERE id = $1 FOR UPDATE"

SELECT_ACTIVE = f"""
SELECT {RECONCILE_COLUMNS} FROM reconciles
WHERE workspace_id = $1 AND status IN ('queued', 'running')
ORDER BY status = 'queued' DESC
LIMIT 1
"""

# A manual request folded into the queued run: due now, full attempt budget (see QUEUE_RECONCILE).
FOLD_MANUAL = """
UPDATE reconciles SET
    refresh = refresh OR $2, requested_at = now(),
    attempt = 0, error = NULL, next_attempt_at = LEAST(next_attempt_at, now())
WHERE id = $1 AND status = 'queued'
"""


@dataclass(frozen=True, slots=True)
class Requested:
    reconcile_id: uuid.UUID
    created: bool  # False: an active run was returned instead of a second


async def lock_workspace_status(conn: Connection, workspace_id: uuid.UUID) -> str | None:
    """Lock the workspace row for this transaction; its status, or None if it does not exist."""
    status = await conn.fetchval(LOCK_WORKSPACE, workspace_id)
    if status is None and await is_tombstone(conn, workspace_id):
        return Status.REMOVED.value  # tombstones (migration 0017) never change: no lock
    return status if isinstance(status, str) else None


async def request_reconcile(
    conn: Connection, workspace_id: uuid.UUID, *, refresh: bool
) -> Requested:
    """A manual request: the queued or running run if there is one, else a new intent.

    Call inside a transaction holding the workspace row lock, so that two requests cannot
    both decide to create a run.
    """
    active = await conn.fetchrow(SELECT_ACTIVE, workspace_id)
    if active is not None and active["status"] == "queued":
        await conn.execute(FOLD_MANUAL, active["id"], refresh)
        return Requested(active["id"], created=False)
    if active is not None and (active["refresh"] or not refresh):
        return Requested(active["id"], created=False)
    # Nothing active, or the running run does not re-resolve sources and this request asks
    # for that: a follow-up run must do it, or the refresh would be silently dropped.
    return Requested(
        await queue_reconcile(conn, workspace_id, "manual", refresh=refresh), created=True
    )


# Every live workspace that declares the plugin gets a refresh run, folded into any run
# already queued for it (which then also refreshes, and is due now with its full attempt
# budget: see QUEUE_RECONCILE).
# The workspaces are locked first, in id order like heartbeats lock them, so that this
# statement never holds a new queued run while waiting for a workspace a heartbeat holds.
FAN_OUT = """
WITH declaring AS (
    SELECT w.id FROM workspaces w
    WHERE w.status = ANY($3::text[])
      AND EXISTS (SELECT 1 FROM declared_plugins d
                  WHERE d.workspace_id = w.id AND (d.source = $1 OR d.name = $2))
    ORDER BY w.id
    FOR KEY SHARE OF w
)
INSERT INTO reconciles (workspace_id, trigger, refresh)
SELECT id, 'plugin_updated', true FROM declaring
ON CONFLICT (workspace_id) WHERE status = 'queued' DO UPDATE SET
    refresh = true, requested_at = now(),
    attempt = 0, error = NULL, next_attempt_at = LEAST(reconciles.next_attempt_at, now())
RETURNING id
"""


async def fan_out_reconciles(
    conn: Connection, *, source: str | None, name: str | None, live_statuses: list[str]
) -> int:
    rows = await conn.fetch(FAN_OUT, source, name, live_statuses)
    return len(rows)


CANCEL_QUEUED = """
UPDATE reconciles SET status = 'failed', error = $2, finished_at = clock_timestamp()
WHERE workspace_id = $1 AND status = 'queued'
"""


async def cancel_queued(conn: Connection, workspace_id: uuid.UUID, reason: str) -> None:
    await conn.execute(CANCEL_QUEUED, workspace_id, reason)


BACKLOG = """
SELECT status, count(*) AS n FROM reconciles
WHERE status IN ('queued', 'running') GROUP BY status
"""


async def backlog(conn: Connection) -> dict[str, int]:
    counts = {"queued": 0, "running": 0}
    counts.update({row["status"]: row["n"] for row in await conn.fetch(BACKLOG)})
    return counts
