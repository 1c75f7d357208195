"""GET /fleet/history's figures, read at most once per HISTORY_CACHE_S per process however
many dashboards ask: at 100 status flips a second (360,000 events in the hour) one read costs
the database ~2.4 s (docs/benchmarks.md). The dashboard draws its newest point from the live
counts of GET /fleet, so the cached minutes only shift up to this late."""

from __future__ import annotations

import asyncpg

from registry.db.fleet_history import Point, status_history
from registry.shared_read import SharedRead

HISTORY_CACHE_S = 30.0


class FleetHistoryCache:
    def __init__(self, ttl_s: float = HISTORY_CACHE_S) -> None:
        self._ttl_s = ttl_s
        # At most one entry per window the route accepts (1..60 minutes).
        self._entries: dict[int, SharedRead[list[Point]]] = {}

    async def points(self, pool: asyncpg.Pool, minutes: int) -> list[Point]:
        if (entry := self._entries.get(minutes)) is None:

            async def read() -> list[Point]:
                async with pool.acquire() as conn:
                    return await status_history(conn, minutes)

            entry = self._entries[minutes] = SharedRead(read, self._ttl_s)
        return await entry.get()
