"""The retention pruner: deletes old history in bounded batches, one process at a time.

Every `prune_interval_s` one process (a session advisory lock, held on a connection of its
own for the pass) deletes what retention allows, one small transaction per batch with a pause
between batches, so pruning never holds locks for long, never makes a heartbeat wait behind a
big delete and never writes one huge transaction's worth of WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from registry.db import Connection
from registry.db import retention as db
from registry.db.errors import DatabaseUnavailable
from registry.metrics import Metrics
from registry.settings import Settings

log = logging.getLogger(__name__)

PRUNE_LOCK_KEY = 0x7072_756E_6572  # "pruner"
TRY_LOCK = "SELECT pg_try_advisory_lock($1)"
UNLOCK = "SELECT pg_advisory_unlock($1)"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    event_retention_s: float
    event_keep: int
    reconcile_retention_s: float
    reconcile_keep: int
    action_retention_s: float
    tombstone_retention_s: float
    batch: int
    pause_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(
            event_retention_s=settings.event_retention_s,
            event_keep=settings.event_keep_per_workspace,
            reconcile_retention_s=settings.reconcile_retention_s,
            reconcile_keep=settings.reconcile_keep_per_workspace,
            action_retention_s=settings.action_retention_s,
            tombstone_retention_s=settings.tombstone_retention_s,
            batch=settings.prune_batch,
            pause_s=settings.prune_pause_s,
        )


@dataclass(slots=True)
class PruneResult:
    ran: bool  # False: another process held the pruning lock
    # Rows deleted, by table.
    deleted: dict[str, int]

    def add(self, table: str, n: int) -> None:
        self.deleted[table] = self.deleted.get(table, 0) + n


async def _in_batches(batch: Callable[[], Awaitable[bool]], pause_s: float) -> None:
    """Run `batch` (one small transaction; True once the table has nothing more to prune this
    pass) until it is done, pausing in between so heartbeats get the database meanwhile."""
    while True:
        if await batch():
            return
        await asyncio.sleep(pause_s)


async def prune(conn: Connection, policy: RetentionPolicy) -> PruneResult:
    """One full pass over every history table; skipped when another process is pruning."""
    if not await conn.fetchval(TRY_LOCK, PRUNE_LOCK_KEY):
        return PruneResult(ran=False, deleted={})
    result = PruneResult(ran=True, deleted={})
    event_cursor = 0
    run_cursor = db.RunCursor()

    async def tombstones() -> bool:
        tomb = await db.prune_tombstones(
            conn, batch=policy.batch, retention_s=policy.tombstone_retention_s
        )
        result.add("workspaces", tomb.workspaces)
        result.add("workspace_events", tomb.events)
        return tomb.workspaces < policy.batch

    async def events() -> bool:
        nonlocal event_cursor
        batch = await db.prune_events(
            conn,
            after=event_cursor,
            batch=policy.batch,
            retention_s=policy.event_retention_s,
            keep=policy.event_keep,
        )
        result.add("workspace_events", batch.deleted)
        event_cursor = batch.cursor
        return batch.done

    async def runs() -> bool:
        nonlocal run_cursor
        batch = await db.prune_runs(
            conn,
            after=run_cursor,
            batch=policy.batch,
            retention_s=policy.reconcile_retention_s,
            keep=policy.reconcile_keep,
        )
        result.add("reconciles", batch.runs)
        result.add("reconcile_steps", batch.steps)
        run_cursor = batch.cursor
        return batch.done

    async def actions() -> bool:
        n = await db.prune_actions(conn, batch=policy.batch, retention_s=policy.action_retention_s)
        result.add("workspace_actions", n)
        return n < policy.batch

    try:
        # Tombstones first: their events and runs go with them, not through the walks below.
        for table in (tombstones, events, runs, actions):
            await _in_batches(table, policy.pause_s)
    finally:
        await conn.execute(UNLOCK, PRUNE_LOCK_KEY)
    return result


class Pruner:
    """Prunes every interval, from one process at a time."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._policy = RetentionPolicy.from_settings(settings)
        self._interval_s = settings.prune_interval_s
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run_once(self) -> PruneResult:
        started = time.monotonic()
        async with self._pool.acquire() as conn:
            result = await prune(conn, self._policy)
        if result.ran:
            for table, n in result.deleted.items():
                self._metrics.pruned_rows.labels(table).inc(n)
            self._metrics.prune_last_run.set(time.time())
            self._metrics.prune_duration.set(time.monotonic() - started)
            if any(result.deleted.values()):
                log.info("pruned %s", result.deleted)
        return result

    async def run_forever(self) -> None:
        # The first pass waits one interval: nothing is urgent at start-up, when a restarted
        # fleet's heartbeats need the database more.
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval_s)
            if self._stop.is_set():
                break
            try:
                await self.run_once()
            except DatabaseUnavailable as exc:
                log.warning("prune skipped: database unavailable: %s", exc)
            except Exception:
                log.exception("prune failed")
