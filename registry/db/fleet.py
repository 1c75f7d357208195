"""Fleet-wide state: the liveness sweeper's mass-expiry guard, shared by every process."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from registry.db import Connection

SELECT_GUARD = "SELECT holding, since, live, stale, updated_at FROM fleet_guard"

UPDATE_GUARD = """
UPDATE fleet_guard SET
    holding = $1,
    since = CASE WHEN $1 AND NOT holding THEN now() WHEN $1 THEN since END,
    live = $2, stale = $3, updated_at = now()
RETURNING holding
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
    stale: int
    updated_at: datetime


async def read_guard(conn: Connection) -> Guard:
    row = await conn.fetchrow(SELECT_GUARD)
    assert row is not None
    return Guard(**dict(row))


async def write_guard(conn: Connection, *, holding: bool, live: int, stale: int) -> bool:
    """Record the guard's state; True when it changed (and then an event was recorded)."""
    was = await read_guard(conn)
    await conn.execute(UPDATE_GUARD, holding, live, stale)
    if was.holding == holding:
        return False
    detail: dict[str, Any] = {"live": live, "stale": stale}
    cause = "mass_expiry_guard_holding" if holding else "mass_expiry_guard_released"
    await conn.execute(INSERT_FLEET_EVENT, cause, detail)
    return True


# Live rows through their partial index, tombstones through theirs (an index-only count,
# bounded by tombstone retention), so tombstones never make the live count scan them.
STATUS_COUNTS = """
SELECT status, count(*) AS n FROM workspaces WHERE status <> 'removed' GROUP BY status
UNION ALL
SELECT 'removed', count(*) FROM workspaces WHERE status = 'removed'
"""


async def status_counts(conn: Connection) -> dict[str, int]:
    """Workspaces per status; a status with none is absent, as the document says (the
    tombstone count is a row even when zero)."""
    return {row["status"]: row["n"] for row in await conn.fetch(STATUS_COUNTS) if row["n"]}
