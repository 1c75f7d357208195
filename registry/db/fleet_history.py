"""The fleet's status counts over the last minutes, rebuilt from the event log (for the
dashboard's chart): today's counts, then each minute's status changes undone, newest first.

Every status change commits with its `status` event (registry/db/transitions.py), so the
counts of one snapshot minus the changes recorded after a moment are the counts at that
moment. What no event recorded (retention pruning a removed workspace's history, say) is
missed; a count is never shown below zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from registry.db import Connection, fleet
from registry.statuses import Status

BUCKET_S = 60
# The statuses the chart draws: a removed workspace is not part of the fleet.
CHARTED = tuple(s.value for s in Status if s is not Status.REMOVED)

# Events are read through their primary key from the newest backwards, down to one older than
# the window by a margin: no index on `at` is needed (one would cost every event's insert),
# and the read is proportional to the window's events, not to the log. `id` is taken at
# insert and `at` is its transaction's start, so an event inside the window has an id above
# that floor unless its transaction ran longer than the margin.
FLOOR_MARGIN_S = 300

STATUS_CHANGES = """
WITH floor AS (
    SELECT id FROM workspace_events
    WHERE at < $1::timestamptz - make_interval(secs => $2::float8 + $4::float8)
    ORDER BY id DESC
    LIMIT 1
)
SELECT GREATEST(0, floor(extract(epoch FROM $1 - at) / $3::int))::int AS ago,
       from_status, to_status, count(*)::int AS n
FROM workspace_events
WHERE id > COALESCE((SELECT id FROM floor), 0)
  AND kind = 'status' AND at > $1 - make_interval(secs => $2)
GROUP BY 1, 2, 3
"""


@dataclass(frozen=True, slots=True)
class Point:
    at: datetime
    statuses: dict[str, int]


async def status_history(conn: Connection, minutes: int) -> list[Point]:
    """`minutes` + 1 points a minute apart, oldest first; the last one is now."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # One snapshot for the counts and the changes; now() is the transaction's start.
        now: datetime = await conn.fetchval("SELECT now()")
        current = await fleet.status_counts(conn)
        rows = await conn.fetch(
            STATUS_CHANGES, now, float(minutes * BUCKET_S), BUCKET_S, float(FLOOR_MARGIN_S)
        )
    undo: dict[int, list[tuple[str | None, str | None, int]]] = {}
    for row in rows:
        undo.setdefault(row["ago"], []).append((row["from_status"], row["to_status"], row["n"]))
    counts = {s: current.get(s, 0) for s in CHARTED}
    points = [Point(now, _floored(counts))]
    for back in range(1, minutes + 1):
        # The changes of the minute after this point, undone.
        for from_status, to_status, n in undo.get(back - 1, ()):
            if to_status in counts:
                counts[to_status] -= n
            if from_status in counts:
                counts[from_status] += n
        points.append(Point(now - timedelta(seconds=back * BUCKET_S), _floored(counts)))
    points.reverse()
    return points


def _floored(counts: dict[str, int]) -> dict[str, int]:
    return {s: max(0, n) for s, n in counts.items()}
