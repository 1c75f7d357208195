"""GET /fleet/history's figures, read at most once per HISTORY_CACHE_S per process however
many dashboards ask: at 100 status flips a second (360,000 events in the hour) one read costs
the database ~2.4 s (docs/benchmarks.md). The dashboard draws its newest point from the live
counts of GET /fleet, so the cached minutes only shift up to this late."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from registry.db.fleet_history import Point, status_history

HISTORY_CACHE_S = 30.0


class FleetHistoryCache:
    def __init__(self, ttl_s: float = HISTORY_CACHE_S) -> None:
        self._ttl_s = ttl_s
        # At most one entry per window the route accepts (1..60 minutes).
        self._entries: dict[int, tuple[float, list[Point]]] = {}
        # Requests that arrive while a read runs wait for it and share its figures.
        self._lock = asyncio.Lock()

    def _fresh(self, minutes: int) -> list[Point] | None:
        entry = self._entries.get(minutes)
        if entry is None or time.monotonic() - entry[0] >= self._ttl_s:
            return None
        return entry[1]

    async def points(self, pool: asyncpg.Pool, minutes: int) -> list[Point]:
        if (cached := self._fresh(minutes)) is not None:
            return cached
        async with self._lock:
            if (cached := self._fresh(minutes)) is not None:
                return cached
            async with pool.acquire() as conn:
                points = await status_history(conn, minutes)
            self._entries[minutes] = (time.monotonic(), points)
            return points
