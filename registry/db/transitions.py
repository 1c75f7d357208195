"""Status writes outside the heartbeat: one guarded transition, and the set-based sweeps.

Every statement that changes `status` takes the set of statuses it may change from as a
parameter computed from registry/statuses.py, writes the event for each row it changed in the
same statement, and fires nothing for rows it did not change. The database's trigger refuses
anything outside the legal table, whatever the writer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from registry.db import Connection
from registry.db.workspaces import is_tombstone
from registry.statuses import Status, legal_sources

TRANSITION = """
WITH target AS (
    SELECT id, status FROM workspaces WHERE id = $1 FOR UPDATE
),
changed AS (
    UPDATE workspaces w SET status = $2, status_changed_at = now()
    FROM target t
    WHERE w.id = t.id AND t.status = ANY($3::text[])
    RETURNING w.id, t.status AS previous_status
),
event AS (
    INSERT INTO workspace_events (workspace_id, kind, from_status, to_status, cause, actor)
    SELECT c.id, 'status', c.previous_status, $2, $4, $5 FROM changed c
)
SELECT t.status AS previous_status, EXISTS (SELECT 1 FROM changed) AS changed
FROM target t
"""


@dataclass(frozen=True, slots=True)
class SilenceWindow:
    """How a workspace's own observed heartbeat interval stretches its silence window:
    `intervals` of them, at most `max_s` seconds in all."""

    intervals: float
    max_s: float

    @classmethod
    def fixed(cls) -> SilenceWindow:
        return cls(0.0, 0.0)


@dataclass(frozen=True, slots=True)
class TransitionResult:
    previous: Status | None  # None: no such workspace
    changed: bool


async def transition(
    conn: Connection,
    workspace_id: uuid.UUID,
    to: Status,
    *,
    cause: str,
    actor: str,
    only_from: frozenset[Status] | None = None,
) -> TransitionResult:
    """Move one workspace to `to` if that is legal from its current status (and in only_from)."""
    sources = [s.value for s in legal_sources(to) if only_from is None or s in only_from]
    row = await conn.fetchrow(TRANSITION, workspace_id, to.value, sources, cause, actor)
    if row is None:
        # Not in `workspaces`: a tombstone, which never changes again, or nothing.
        if await is_tombstone(conn, workspace_id):
            return TransitionResult(Status.REMOVED, False)
        return TransitionResult(None, False)
    return TransitionResult(Status(row["previous_status"]), row["changed"])


# Tombstones are not in `workspaces` (migration 0017): they cost the sweeper nothing. The
# `status <> 'removed'` below, implied by the legal sources anyway, is only a guard now.
# A workspace is silent after `$2` seconds, or after `$6` of its own observed heartbeat
# intervals if that is longer, up to `$7` seconds: the window follows each runtime's real
# interval, computed row by row in the same set-based statement.
# No silence counts from before `$8` (when the registry could hear again after an outage):
# written as its own condition, so the first one keeps its index.
# Oldest silence first, so a capped sweep expires the longest-dead workspaces. SKIP LOCKED
# passes over rows a heartbeat holds right now: those are alive. A row a heartbeat updated
# after this statement's snapshot is re-checked against the WHERE once locked.
EXPIRE_SILENT = """
WITH silent AS (
    SELECT id, status FROM workspaces
    WHERE status = ANY($1::text[]) AND status <> 'removed'
      AND COALESCE(last_heartbeat_at, status_changed_at) < now() - make_interval(secs =>
              GREATEST($2, LEAST($6 * COALESCE(heartbeat_interval_s, 0), $7)))
      AND ($8::timestamptz IS NULL OR $8 < now() - make_interval(secs =>
              GREATEST($2, LEAST($6 * COALESCE(heartbeat_interval_s, 0), $7))))
    ORDER BY COALESCE(last_heartbeat_at, status_changed_at)
    LIMIT $3
    FOR UPDATE SKIP LOCKED
),
changed AS (
    UPDATE workspaces w SET status = $4, status_changed_at = now()
    FROM silent s
    WHERE w.id = s.id
    RETURNING w.id, s.status AS previous_status
),
event AS (
    INSERT INTO workspace_events (workspace_id, kind, from_status, to_status, cause, actor)
    SELECT c.id, 'status', c.previous_status, $4, $5, 'sweeper' FROM changed c
)
SELECT previous_status, count(*) AS n FROM changed GROUP BY previous_status
"""


async def expire_silent(
    conn: Connection,
    *,
    statuses: frozenset[Status],
    silent_for_s: float,
    to: Status,
    cause: str,
    limit: int,
    window: SilenceWindow | None = None,
    counted_from: datetime | None = None,
) -> dict[Status, int]:
    """Move up to `limit` workspaces silent for `silent_for_s` (stretched by `window`, and
    counted from `counted_from` at the earliest) from `statuses` to `to`; returns how many
    moved, by the status they left."""
    sources = [s.value for s in statuses if s in legal_sources(to)]
    window = window or SilenceWindow.fixed()
    rows = await conn.fetch(
        EXPIRE_SILENT,
        sources,
        silent_for_s,
        limit,
        to.value,
        cause,
        window.intervals,
        window.max_s,
        counted_from,
    )
    return {Status(row["previous_status"]): row["n"] for row in rows}


# Silence counts from `$5` at the earliest (GREATEST ignores a NULL), as in EXPIRE_SILENT;
# a count needs no index, so one expression does.
COUNT_SILENT = """
SELECT count(*) AS live,
       count(*) FILTER (WHERE GREATEST(COALESCE(last_heartbeat_at, status_changed_at),
                                       $5::timestamptz)
                              < now() - make_interval(secs =>
                                  GREATEST($2, LEAST($3 * COALESCE(heartbeat_interval_s, 0),
                                                     $4)))) AS silent
FROM workspaces
WHERE status = ANY($1::text[]) AND status <> 'removed'
"""


@dataclass(frozen=True, slots=True)
class FleetCount:
    live: int
    silent: int


async def count_silent(
    conn: Connection,
    statuses: frozenset[Status],
    silent_for_s: float,
    window: SilenceWindow | None = None,
    counted_from: datetime | None = None,
) -> FleetCount:
    window = window or SilenceWindow.fixed()
    row = await conn.fetchrow(
        COUNT_SILENT,
        [s.value for s in statuses],
        silent_for_s,
        window.intervals,
        window.max_s,
        counted_from,
    )
    assert row is not None
    return FleetCount(row["live"], row["silent"])
