"""Fleet-wide state: the liveness sweeper's mass-expiry guard, shared by every process."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from registry.db import Connection

SELECT_GUARD = """
SELECT holding, since, live, stale, expired, updated_at, silence_counted_from,
       silent_changed_at, released_at, now() AS now, acked_at, acked_by
FROM fleet_guard
"""

UPDATE_GUARD = """
UPDATE fleet_guard SET
    holding = $1,
    since = CASE WHEN $1 AND NOT holding THEN now() WHEN $1 THEN since END,
    live = $2, stale = $3, expired = $4, updated_at = now(),
    silent_changed_at = $5, released_at = $6,
    -- An acknowledgement lasts as long as the hold it acknowledged.
    acked_at = CASE WHEN $1 THEN acked_at END,
    acked_by = CASE WHEN $1 THEN acked_by END
RETURNING holding
"""

# The figures alone, the guard's judgement untouched: what a sweeper in its start-up grace
# writes (it judges nobody yet, but /fleet should not show figures from before the start).
UPDATE_FIGURES = """
UPDATE fleet_guard SET live = $1, stale = $2, expired = $3, updated_at = now()
RETURNING holding
"""

# The registry hears again: silence is counted from now. Either the caller knows it could not
# reach the database since its last sweep ($1), or no process has swept for `$2` seconds (every
# process sweeps every interval, so nobody was there to hear: all were down, or the database
# was; NULL: never). Returns the row's value either way.
HEAR_AGAIN = """
UPDATE fleet_guard SET silence_counted_from = CASE
    WHEN $1 OR updated_at < now() - make_interval(secs => $2) THEN now()
    ELSE silence_counted_from END
RETURNING silence_counted_from
"""

INSERT_FLEET_EVENT = """
INSERT INTO workspace_events (workspace_id, kind, cause, actor, detail)
VALUES (NULL, 'fleet', $1, 'sweeper', $2)
"""


@dataclass(frozen=True, slots=True)
class Guard:
    holding: bool
    since: datetime | None
    live: int
    stale: int  # of the live ones, silent past their window
    updated_at: datetime
    expired: int = 0  # taken offline by the sweeper within the last liveness window
    # When the registry could hear again after an outage: no silence counts from before it.
    silence_counted_from: datetime | None = None
    silent_changed_at: datetime | None = None  # when the silent count last changed
    released_at: datetime | None = None  # when the guard last let go
    now: datetime | None = None  # the database's clock when this was read
    acked_at: datetime | None = None
    acked_by: str | None = None

    @property
    def acknowledged(self) -> bool:
        """An operator acknowledged this hold: the sweeper expires at its normal pace."""
        return (
            self.holding
            and self.acked_at is not None
            and self.since is not None
            and self.acked_at >= self.since
        )


async def read_guard(conn: Connection) -> Guard:
    row = await conn.fetchrow(SELECT_GUARD)
    assert row is not None
    return Guard(**dict(row))


async def hear_again(
    conn: Connection, *, deaf: bool, deaf_after_s: float | None
) -> datetime | None:
    """Start counting silence from now if the registry could not hear (`deaf`, or no sweep
    for `deaf_after_s`, None: never); returns since when silence counts (None: no outage)."""
    counted_from: datetime | None = await conn.fetchval(HEAR_AGAIN, deaf, deaf_after_s)
    return counted_from


async def write_guard(
    conn: Connection,
    *,
    holding: bool,
    live: int,
    stale: int,
    expired: int = 0,
    silent_changed_at: datetime | None = None,
    released_at: datetime | None = None,
) -> bool:
    """Record the guard's state; True when it changed (and then an event was recorded)."""
    was = await read_guard(conn)
    await conn.execute(UPDATE_GUARD, holding, live, stale, expired, silent_changed_at, released_at)
    if was.holding == holding:
        return False
    detail: dict[str, Any] = {"live": live, "stale": stale, "expired": expired}
    cause = "mass_expiry_guard_holding" if holding else "mass_expiry_guard_released"
    await conn.execute(INSERT_FLEET_EVENT, cause, detail)
    return True


# Only a holding guard can be acknowledged; acknowledging it again keeps the first.
ACK_GUARD = """
UPDATE fleet_guard SET
    acked_at = CASE WHEN acked_at >= since THEN acked_at ELSE now() END,
    acked_by = CASE WHEN acked_at >= since THEN acked_by ELSE $1 END
WHERE holding
RETURNING holding, since, live, stale, expired, updated_at, silence_counted_from,
          silent_changed_at, released_at, now() AS now, acked_at, acked_by
"""


async def acknowledge_guard(conn: Connection, actor: str) -> Guard | None:
    """Release the current hold (the sweeper stops slowing expiry until the guard lets go
    by itself); None when the guard is not holding."""
    row = await conn.fetchrow(ACK_GUARD, actor)
    return None if row is None else Guard(**dict(row))


async def write_figures(conn: Connection, *, live: int, stale: int, expired: int) -> bool:
    """Record the figures only; returns whether the guard holds."""
    holding: bool = await conn.fetchval(UPDATE_FIGURES, live, stale, expired)
    return holding


# Expirations older than the window are deleted as the window slides past them (the rows of
# one window are a few dozen at most: one per sweep that expired anything).
PRUNE_EXPIRATIONS = "DELETE FROM fleet_expirations WHERE at < now() - make_interval(secs => $1)"
COUNT_EXPIRATIONS = "SELECT COALESCE(sum(n), 0)::int FROM fleet_expirations"
RECORD_EXPIRATIONS = "INSERT INTO fleet_expirations (n) VALUES ($1)"


async def recent_expirations(conn: Connection, window_s: float) -> int:
    """How many workspaces the sweeper took offline within the last `window_s` seconds."""
    await conn.execute(PRUNE_EXPIRATIONS, window_s)
    expired: int = await conn.fetchval(COUNT_EXPIRATIONS)
    return expired


async def record_expirations(conn: Connection, n: int) -> None:
    if n > 0:
        await conn.execute(RECORD_EXPIRATIONS, n)


# Live rows only: tombstones are rows of `removed_workspaces`, counted as they come and go
# (triggers of migrations 0015 and 0017), so a million of them cost nothing here.
STATUS_COUNTS = """
SELECT status, count(*) AS n FROM workspaces WHERE status <> 'removed' GROUP BY status
UNION ALL
SELECT 'removed', n FROM tombstone_count
"""


async def status_counts(conn: Connection) -> dict[str, int]:
    """Workspaces per status; a status with none is absent, as the document says (the
    tombstone count is a row even when zero)."""
    return {row["status"]: row["n"] for row in await conn.fetch(STATUS_COUNTS) if row["n"]}
