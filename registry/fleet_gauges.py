"""The fleet-wide gauges of /metrics, read from the database at scrape time, at most once per
`ttl_s` however many scrapers there are (several Prometheus replicas, a human with curl):
one SharedRead (registry/shared_read.py), whose callers share a read in flight."""

from __future__ import annotations

import time

import asyncpg

from registry import sync_state
from registry.db import fleet, reconciles
from registry.db.errors import DatabaseUnavailable
from registry.db.fleet_counts import FleetCounts, fleet_counts
from registry.metrics import Metrics
from registry.shared_read import SharedRead

# Scrapes must answer quickly even when the database does not.
QUERY_TIMEOUT_S = 2.0


class FleetGauges:
    def __init__(self, metrics: Metrics, ttl_s: float) -> None:
        self._metrics = metrics
        self._ttl_s = ttl_s
        # Scrapes that arrive while a read runs wait for it and share its figures.
        self._shared: SharedRead[FleetCounts] | None = None
        # The last figures read, for GET /fleet's counts by plugins sync (the same read).
        self.counts: FleetCounts | None = None

    async def refresh(self, pool: asyncpg.Pool, min_ttl_s: float = 0.0) -> None:
        """Read the fleet's figures unless they are fresh (younger than the configured period,
        or `min_ttl_s` if longer); if the database is unreachable they keep their last values
        and `registry_database_up` says 0."""
        if self._shared is None:
            self._shared = SharedRead(lambda: self._read(pool), self._ttl_s)
        try:
            self.counts = await self._shared.get(min_ttl_s)
        except DatabaseUnavailable:
            self._metrics.database_up.set(0)

    async def _read(self, pool: asyncpg.Pool) -> FleetCounts:
        """One read of the figures, published to the gauges as it completes."""
        now = time.monotonic()
        metrics = self._metrics
        async with pool.acquire(timeout=QUERY_TIMEOUT_S) as conn:
            # What changed since the refresher last ran is judged first, so the counts
            # are current (one batch at most: a scrape never waits on a backfill, nor
            # longer than its timeout on another process judging).
            await sync_state.refresh(conn, rounds=1, lock_wait_s=QUERY_TIMEOUT_S)
            counts = await fleet_counts(conn)
            backlog = await reconciles.backlog(conn)
            guard = await fleet.read_guard(conn)
        metrics.fleet_query_seconds.set(time.monotonic() - now)
        metrics.database_up.set(1)
        for status, n in counts.by_status.items():
            metrics.workspaces.labels(status).set(n)
        for sync, n in counts.by_sync.items():
            metrics.workspaces_by_sync.labels(sync).set(n)
        for status, n in backlog.items():
            metrics.reconcile_backlog.labels(status).set(n)
        metrics.mass_expiry_guard_holding.set(1 if guard.holding else 0)
        return counts
