"""Workspaces by status and by `plugins_sync`, fleet-wide, in one aggregate statement (for
/metrics).

`plugins_sync` is the stored value (workspaces.plugins_sync, kept by registry/sync_state.py
with the views' own derivation), so this is one GROUP BY. Two differences from the views, on
purpose: a workspace changed within the last second or so (its stored value not judged again
yet) is counted by the value stored before, and one never judged yet (right after the
migration that added the column) is counted by status only; and a source the allowlist
refuses now is a check of each process (it may resolve paths on disk), so such a workspace is
counted by the rest of its state here while its view says `out_of_sync`.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.db import Connection
from registry.statuses import Status, Sync

# Tombstones are not read: their number is kept as they come and go
# (migrations/0015_tombstone_count.sql).
FLEET_COUNTS = """
SELECT status, plugins_sync AS sync, count(*)::int AS n
FROM workspaces WHERE status <> 'removed'
GROUP BY 1, 2
UNION ALL
SELECT 'removed', NULL, n::int FROM tombstone_count
"""


@dataclass(frozen=True, slots=True)
class FleetCounts:
    by_status: dict[str, int]  # every status, zero included
    by_sync: dict[str, int]  # non-removed workspaces; every plugins_sync, zero included


async def fleet_counts(conn: Connection) -> FleetCounts:
    by_status = {s.value: 0 for s in Status}
    by_sync = {s.value: 0 for s in Sync}
    for row in await conn.fetch(FLEET_COUNTS):
        by_status[row["status"]] += row["n"]
        if row["sync"] is not None:
            by_sync[row["sync"]] += row["n"]
    return FleetCounts(by_status, by_sync)
