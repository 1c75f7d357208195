"""GET /fleet's counts by status, shared by every caller of this process.

A count is one scan of the live fleet (~60 ms of the database at 100k workspaces, growing with
the fleet) and dashboards poll it: it is counted at most once per RECOUNT_S, and while the last
count is younger than `max_age_s` (REGISTRY_FLEET_CACHE_S) a caller gets it at once while it
is counted again in the background (registry/shared_read.py). 0 counts on every request.

The process's event feed (while anyone subscribes to /events, as the dashboard does) drops the
count whenever it reads an event, before it delivers it: a dashboard that refreshes its tiles
on an event never gets a count from before that event.
"""

from __future__ import annotations

import asyncpg

from registry.db import fleet
from registry.shared_read import SharedRead

RECOUNT_S = 1.0


class FleetStatuses:
    def __init__(self, pool: asyncpg.Pool, max_age_s: float) -> None:
        self._pool = pool
        self._shared = SharedRead(self._count, ttl_s=min(RECOUNT_S, max_age_s), stale_s=max_age_s)

    async def _count(self) -> dict[str, int]:
        async with self._pool.acquire() as conn:
            return await fleet.status_counts(conn)

    async def counts(self) -> dict[str, int]:
        return await self._shared.get()

    def invalidate(self) -> None:
        """Something happened (an event was read): the next caller waits for a new count."""
        self._shared.invalidate()

    async def close(self) -> None:
        await self._shared.close()
